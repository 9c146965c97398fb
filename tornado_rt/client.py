"""Clients of a tornado-rt server: publish from any Python process, subscribe with reconnects.

* :class:`Publisher` (synchronous, standard library only: ``http.client``) and
  :class:`AsyncPublisher` (asyncio, also usable from Tornado) talk to the HTTP server API of
  ``tornado-rt serve`` with an API key: ``publish``, ``publish_many`` (one HTTP batch),
  ``publish_individual``, ``disconnect``, ``revoke``. A Django view or a Celery task needs no
  event loop. Connections are kept alive and reused.
* :class:`Subscriber` (asyncio, needs the ``client`` extra: ``pip install 'tornado-rt[client]'``)
  connects to the WebSocket endpoint, subscribes to pages, yields messages and reconnects with
  jittered exponential backoff, resubscribing every page.

Errors: :class:`ApiError` for an answer of the server that is not a success (``status``,
``message``, and ``field``: the dotted path of the offending value for a 400, like every error of
tornado-rt); :class:`ConnectionFailed` when no answer came (``sent`` tells whether the request may
have reached the server).

Retries: a request is retried, with jittered exponential backoff and at most ``retries`` times,
only when a retry cannot publish twice: the connection could not be opened (nothing was sent), or
the server answered 503 (the broker could not take the publish, so nothing was published). A
connection that fails after the request was sent is never retried: :class:`ConnectionFailed` with
``sent=True`` says the outcome is unknown. Every envelope carries an idempotency ``id`` (a
UUID4) by default, so that a caller retrying such a failure itself can be deduplicated by a server
that supports it; a server that refuses the key (400 naming ``id``, which publishes nothing) gets
the request again without ids, once, and the publisher stops sending them.
"""
from __future__ import annotations

import asyncio
import http.client
import inspect
import json
import logging
import os
import random
import select
import ssl as ssl_module
import threading
import time
import uuid
from typing import (Any, AsyncIterator, Awaitable, Callable, Dict, Iterable, List, Mapping, Optional,
                    Sequence, Tuple, Type, Union)
from urllib.parse import quote, urlsplit

log = logging.getLogger("tornado_rt.client")

__all__ = ["ApiError", "AsyncPublisher", "AuthenticationFailed", "ClientError", "ConnectionFailed",
           "Publisher", "Subscriber", "SubscribeTimeout"]

DEFAULT_TIMEOUT = 10.0
USER_AGENT = "tornado-rt-client"


# --- errors -----------------------------------------------------------------------------------------

class ClientError(Exception):
    """Base of the errors of this module."""


class ApiError(ClientError):
    """The server answered with an error status. ``field`` is the dotted path of the offending
    value when the server named one (every 400 of a publish does, e.g. ``[1].message.table_id``)."""

    def __init__(self, status: int, message: str, field: Optional[str] = None, body: Any = None):
        where = f" (field {field})" if field else ""
        super().__init__(f"HTTP {status}: {message}{where}")
        self.status = status
        self.message = message
        self.field = field
        self.body = body


class ConnectionFailed(ClientError):
    """No answer from the server. ``sent`` is False when the request certainly did not reach it
    (the connection could not be opened) and True when the outcome is unknown."""

    def __init__(self, message: str, sent: bool):
        super().__init__(message)
        self.sent = sent


class _NotSent(Exception):
    """Internal: the connection could not be opened; nothing was sent (safe to retry)."""


# --- what the HTTP API takes --------------------------------------------------------------------------

def _new_id() -> str:
    return str(uuid.uuid4())


def message_envelope(message: Mapping[str, Any], to: Any = None, ignore_web_socket_id: Optional[str] = None,
                     exclude_user_ids: Optional[Iterable[Any]] = None) -> Dict[str, Any]:
    """One envelope of ``POST /api/publish`` (keys the caller did not give are left out, so the
    server applies its defaults: the message type's own audience, the ``WebSocketId`` header)."""
    envelope: Dict[str, Any] = {"message": message}
    if to is not None:
        envelope["to"] = to
    if ignore_web_socket_id is not None:
        envelope["ignore_web_socket_id"] = ignore_web_socket_id
    if exclude_user_ids is not None:
        envelope["exclude_user_ids"] = list(exclude_user_ids)
    return envelope


def individual_envelope(payloads: Mapping[Any, Mapping[str, Any]],
                        ignore_web_socket_id: Optional[str] = None) -> Dict[str, Any]:
    """An envelope with one message per user: ``{user_id: message}``."""
    envelope: Dict[str, Any] = {"individual": {str(user): message for user, message in payloads.items()}}
    if ignore_web_socket_id is not None:
        envelope["ignore_web_socket_id"] = ignore_web_socket_id
    return envelope


def as_envelope(item: Mapping[str, Any]) -> Dict[str, Any]:
    """An item of :meth:`Publisher.publish_many`: an envelope (``message``/``individual`` key)
    as it is, or a bare message (it has a ``type``) wrapped as ``{"message": item}``."""
    if not isinstance(item, Mapping):
        raise TypeError(f"publish_many takes envelopes or messages (dicts), got {item!r}")
    if "message" in item or "individual" in item or "type" not in item:
        return dict(item)
    return {"message": dict(item)}


def _refuses_ids(error: ApiError) -> bool:
    field = error.field or ""
    return error.status == 400 and (field == "id" or field.endswith(".id")) and "unexpected key" in error.message


def _parse_base(url: str) -> Tuple[str, str, int, str]:
    """``(scheme, host, port, path prefix)`` of the server's base URL (``http://host:port/``,
    optionally with a path prefix; a trailing ``api/`` is accepted and dropped)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the server URL must look like http://127.0.0.1:8000/, got {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    prefix = parts.path.rstrip("/")
    if prefix.endswith("/api"):
        prefix = prefix[: -len("/api")]
    return parts.scheme, parts.hostname, port, prefix


def _backoff(attempt: int, base: float, cap: float) -> float:
    """Full jitter: a random delay up to ``base * 2**attempt`` (at most ``cap``)."""
    return random.uniform(0.5, 1.0) * min(cap, base * (2 ** attempt))


def _answer(status: int, body: bytes) -> Any:
    try:
        parsed = json.loads(body.decode("utf-8")) if body else None
    except ValueError:
        parsed = body.decode("utf-8", "replace")
    if 200 <= status < 300:
        return parsed
    if isinstance(parsed, dict):
        raise ApiError(status, str(parsed.get("error") or http.client.responses.get(status, "error")),
                       parsed.get("field"), parsed)
    raise ApiError(status, http.client.responses.get(status, "error"), None, parsed)


class _PublisherBase:
    def __init__(self, url: str, api_key: str, *, timeout: float = DEFAULT_TIMEOUT, retries: int = 3,
                 backoff: float = 0.2, max_backoff: float = 5.0, idempotency_ids: bool = True,
                 web_socket_id: Optional[str] = None, ssl_context: Optional[ssl_module.SSLContext] = None,
                 pool_size: int = 4):
        if not api_key:
            raise ValueError("api_key is required (one of the server's --api-key values)")
        if retries < 0 or timeout <= 0 or backoff < 0 or pool_size < 1:
            raise ValueError("retries and backoff must not be negative; timeout and pool_size must be positive")
        self.scheme, self.host, self.port, self.prefix = _parse_base(url)
        self.url = f"{self.scheme}://{self.host}:{self.port}{self.prefix}/"
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        #: Whether envelopes get an idempotency ``id`` (turned off, with a warning, by a server that
        #: refuses the key).
        self.idempotency_ids = idempotency_ids
        #: Default ``WebSocketId`` header: the server then skips that connection (the publisher's
        #: own browser tab) unless an envelope says otherwise.
        self.web_socket_id = web_socket_id
        self.ssl_context = ssl_context
        self.pool_size = pool_size

    def _headers(self, body: Optional[bytes], web_socket_id: Optional[str]) -> Dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json",
                   "User-Agent": USER_AGENT}
        if body is not None:
            headers["Content-Type"] = "application/json"
        sender = web_socket_id if web_socket_id is not None else self.web_socket_id
        if sender:
            headers["WebSocketId"] = sender
        return headers

    def _with_ids(self, envelopes: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        if not self.idempotency_ids:
            return envelopes
        return [e if "id" in e else {**e, "id": _new_id()} for e in envelopes]

    def _ids_refused(self, error: ApiError) -> bool:
        if self.idempotency_ids and _refuses_ids(error):
            log.warning("the server at %s does not take idempotency ids; sending without them", self.url)
            self.idempotency_ids = False
            return True
        return False

    @staticmethod
    def _without_ids(body: Any) -> Any:
        if isinstance(body, list):
            return [{k: v for k, v in e.items() if k != "id"} if isinstance(e, dict) else e for e in body]
        return {k: v for k, v in body.items() if k != "id"}

    @staticmethod
    def _encode(body: Any) -> bytes:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# --- the synchronous publisher ------------------------------------------------------------------------

class Publisher(_PublisherBase):
    """Publish through the HTTP server API, synchronously (standard library only; thread-safe).

    ``Publisher("http://127.0.0.1:8000", api_key)``; ``timeout`` bounds connecting and each
    request; ``retries``/``backoff``/``max_backoff`` bound the safe retries (see the module
    documentation); ``web_socket_id`` is a default ``WebSocketId`` header. Use it as a context
    manager or call :meth:`close` to close the kept-alive connections.
    """

    def __init__(self, url: str, api_key: str, **kwargs: Any):
        super().__init__(url, api_key, **kwargs)
        self._idle: List[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    # -- the API ---------------------------------------------------------------------------------
    def publish(self, message: Mapping[str, Any], to: Any = None, ignore_web_socket_id: Optional[str] = None,
                exclude_user_ids: Optional[Iterable[Any]] = None, *, id: Optional[str] = None,
                web_socket_id: Optional[str] = None) -> Dict[str, Any]:
        """Publish one message (``to``: an audience; default: the message type's own). Returns the
        server's answer, ``{"published": 1, "delivered": d}`` (``d``: connections of the answering
        server process that were handed it)."""
        envelope = message_envelope(message, to, ignore_web_socket_id, exclude_user_ids)
        if id is not None:
            envelope["id"] = id
        return self._publish(self._with_ids([envelope])[0], web_socket_id)

    def publish_many(self, items: Sequence[Mapping[str, Any]], *, web_socket_id: Optional[str] = None
                     ) -> Dict[str, Any]:
        """Publish envelopes (or bare messages) in one HTTP request: all are validated before any
        is published. Returns ``{"published": n, "delivered": d}``."""
        return self._publish(self._with_ids([as_envelope(i) for i in items]), web_socket_id)

    def publish_envelope(self, envelope: Mapping[str, Any], *, web_socket_id: Optional[str] = None
                         ) -> Dict[str, Any]:
        """Publish one envelope as the HTTP API takes it (``message``/``to``/... or
        ``individual``); errors name fields without the ``[i].`` of a batch."""
        return self._publish(self._with_ids([dict(envelope)])[0], web_socket_id)

    def publish_individual(self, payloads: Mapping[Any, Mapping[str, Any]],
                           ignore_web_socket_id: Optional[str] = None, *, id: Optional[str] = None,
                           web_socket_id: Optional[str] = None) -> Dict[str, Any]:
        """One message per user, ``{user_id: message}``, in one envelope."""
        envelope = individual_envelope(payloads, ignore_web_socket_id)
        if id is not None:
            envelope["id"] = id
        return self._publish(self._with_ids([envelope])[0], web_socket_id)

    def disconnect(self, user_ids: Iterable[Any], ignore_web_socket_ids: Optional[Sequence[str]] = None,
                   ) -> Dict[str, Any]:
        """Force-disconnect (close 4003) every connection of the users. Returns
        ``{"disconnected": n}``."""
        body: Dict[str, Any] = {"user_ids": list(user_ids)}
        if ignore_web_socket_ids is not None:
            body["ignore_web_socket_ids"] = list(ignore_web_socket_ids)
        return self.request("POST", "/api/disconnect", body)

    def revoke(self, user_ids: Iterable[Any], permission_group: str) -> Dict[str, Any]:
        """Drop the users' pages in ``permission_group`` (they get ``page_discard``)."""
        return self.request("POST", "/api/revoke", {"user_ids": list(user_ids), "permission_group": permission_group})

    def _publish(self, body: Any, web_socket_id: Optional[str]) -> Dict[str, Any]:
        try:
            return self.request("POST", "/api/publish", body, web_socket_id=web_socket_id)
        except ApiError as exc:
            if not self._ids_refused(exc):
                raise
        return self.request("POST", "/api/publish", self._without_ids(body), web_socket_id=web_socket_id)

    # -- HTTP --------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, web_socket_id: Optional[str] = None) -> Any:
        """One call of the HTTP API with the safe retries; returns the parsed JSON answer."""
        data = None if body is None else self._encode(body)
        headers = self._headers(data, web_socket_id)
        target = self.prefix + path
        attempt = 0
        while True:
            try:
                status, payload = self._exchange(method, target, data, headers)
            except _NotSent as exc:
                if attempt >= self.retries:
                    raise ConnectionFailed(f"cannot connect to {self.url}: {exc}", sent=False) from None
            else:
                if status != 503 or attempt >= self.retries:
                    return _answer(status, payload)
            time.sleep(_backoff(attempt, self.backoff, self.max_backoff))
            attempt += 1

    def _exchange(self, method: str, target: str, data: Optional[bytes], headers: Dict[str, str]
                  ) -> Tuple[int, bytes]:
        conn = self._checkout()
        try:
            conn.request(method, target, body=data, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ConnectionFailed(f"{method} {target} to {self.url} failed after sending, outcome unknown: "
                                   f"{exc or type(exc).__name__}", sent=True) from None
        if response.will_close:
            conn.close()
        else:
            self._checkin(conn)
        return response.status, payload

    def _checkout(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._pid != os.getpid():  # forked (a Celery prefork worker): never share a socket
                self._pid = os.getpid()
                for conn in self._idle:
                    conn.close()
                self._idle = []
            while self._idle:
                conn = self._idle.pop()
                if _usable(conn.sock):
                    return conn
                conn.close()
        fresh: http.client.HTTPConnection
        if self.scheme == "https":
            fresh = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                context=self.ssl_context)
        else:
            fresh = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            fresh.connect()
        except OSError as exc:
            fresh.close()
            raise _NotSent(exc.strerror or str(exc) or type(exc).__name__) from None
        return fresh

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.pool_size:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the kept-alive connections (the publisher stays usable)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _usable(sock: Any) -> bool:
    """Whether a kept-alive socket may take a request: an idle HTTP connection has nothing to
    read, so a readable one was closed by the server (or is broken)."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


# --- the asyncio publisher ------------------------------------------------------------------------------

class _AsyncConnection:
    """One kept-alive HTTP/1.1 connection over asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        return not (self.writer.is_closing() or self.reader.at_eof())

    def close(self) -> None:
        self.writer.close()

    async def exchange(self, method: str, target: str, host: str, data: Optional[bytes],
                       headers: Dict[str, str]) -> Tuple[int, bytes, bool]:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"Content-Length: {len(data or b'')}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (data or b""))
        await self.writer.drain()
        status_line = await self.reader.readline()
        parts = status_line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise http.client.BadStatusLine(status_line.decode("latin-1", "replace").strip() or "empty answer")
        status = int(parts[1])
        fields: Dict[str, str] = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise http.client.IncompleteRead(b"")
            name, _, value = line.decode("latin-1").partition(":")
            fields[name.strip().lower()] = value.strip()
        if "chunked" in fields.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size = int((await self.reader.readline()).split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(chunks)
        elif "content-length" in fields:
            body = await self.reader.readexactly(int(fields["content-length"]))
        else:
            body = await self.reader.read()
            return status, body, False
        keep = fields.get("connection", "").lower() != "close" and parts[0] != "HTTP/1.0"
        return status, body, keep


class AsyncPublisher(_PublisherBase):
    """:class:`Publisher` for asyncio (and Tornado, which runs on asyncio): the same methods, as
    coroutines, over a small HTTP/1.1 client with kept-alive connections. Use it as an async
    context manager or await :meth:`close`."""

    def __init__(self, url: str, api_key: str, **kwargs: Any):
        super().__init__(url, api_key, **kwargs)
        self._idle: List[_AsyncConnection] = []

    async def publish(self, message: Mapping[str, Any], to: Any = None,
                      ignore_web_socket_id: Optional[str] = None,
                      exclude_user_ids: Optional[Iterable[Any]] = None, *, id: Optional[str] = None,
                      web_socket_id: Optional[str] = None) -> Dict[str, Any]:
        """See :meth:`Publisher.publish`."""
        envelope = message_envelope(message, to, ignore_web_socket_id, exclude_user_ids)
        if id is not None:
            envelope["id"] = id
        return await self._publish(self._with_ids([envelope])[0], web_socket_id)

    async def publish_many(self, items: Sequence[Mapping[str, Any]], *, web_socket_id: Optional[str] = None
                           ) -> Dict[str, Any]:
        """See :meth:`Publisher.publish_many`."""
        return await self._publish(self._with_ids([as_envelope(i) for i in items]), web_socket_id)

    async def publish_envelope(self, envelope: Mapping[str, Any], *, web_socket_id: Optional[str] = None
                               ) -> Dict[str, Any]:
        """See :meth:`Publisher.publish_envelope`."""
        return await self._publish(self._with_ids([dict(envelope)])[0], web_socket_id)

    async def publish_individual(self, payloads: Mapping[Any, Mapping[str, Any]],
                                 ignore_web_socket_id: Optional[str] = None, *, id: Optional[str] = None,
                                 web_socket_id: Optional[str] = None) -> Dict[str, Any]:
        """See :meth:`Publisher.publish_individual`."""
        envelope = individual_envelope(payloads, ignore_web_socket_id)
        if id is not None:
            envelope["id"] = id
        return await self._publish(self._with_ids([envelope])[0], web_socket_id)

    async def disconnect(self, user_ids: Iterable[Any], ignore_web_socket_ids: Optional[Sequence[str]] = None,
                         ) -> Dict[str, Any]:
        """See :meth:`Publisher.disconnect`."""
        body: Dict[str, Any] = {"user_ids": list(user_ids)}
        if ignore_web_socket_ids is not None:
            body["ignore_web_socket_ids"] = list(ignore_web_socket_ids)
        return await self.request("POST", "/api/disconnect", body)

    async def revoke(self, user_ids: Iterable[Any], permission_group: str) -> Dict[str, Any]:
        """See :meth:`Publisher.revoke`."""
        return await self.request("POST", "/api/revoke",
                                  {"user_ids": list(user_ids), "permission_group": permission_group})

    async def _publish(self, body: Any, web_socket_id: Optional[str]) -> Dict[str, Any]:
        try:
            return await self.request("POST", "/api/publish", body, web_socket_id=web_socket_id)
        except ApiError as exc:
            if not self._ids_refused(exc):
                raise
        return await self.request("POST", "/api/publish", self._without_ids(body), web_socket_id=web_socket_id)

    async def request(self, method: str, path: str, body: Any = None, *,
                      web_socket_id: Optional[str] = None) -> Any:
        """See :meth:`Publisher.request`."""
        data = None if body is None else self._encode(body)
        headers = self._headers(data, web_socket_id)
        target = self.prefix + path
        attempt = 0
        while True:
            try:
                status, payload = await self._exchange(method, target, data, headers)
            except _NotSent as exc:
                if attempt >= self.retries:
                    raise ConnectionFailed(f"cannot connect to {self.url}: {exc}", sent=False) from None
            else:
                if status != 503 or attempt >= self.retries:
                    return _answer(status, payload)
            await asyncio.sleep(_backoff(attempt, self.backoff, self.max_backoff))
            attempt += 1

    async def _exchange(self, method: str, target: str, data: Optional[bytes], headers: Dict[str, str]
                        ) -> Tuple[int, bytes]:
        conn = await self._checkout()
        try:
            status, payload, keep = await asyncio.wait_for(
                conn.exchange(method, target, f"{self.host}:{self.port}", data, headers), self.timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, http.client.HTTPException,
                ValueError) as exc:
            conn.close()
            raise ConnectionFailed(f"{method} {target} to {self.url} failed after sending, outcome unknown: "
                                   f"{exc or type(exc).__name__}", sent=True) from None
        except BaseException:
            conn.close()  # cancelled: the connection is in an unknown state
            raise
        if keep and len(self._idle) < self.pool_size:
            self._idle.append(conn)
        else:
            conn.close()
        return status, payload

    async def _checkout(self) -> _AsyncConnection:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn
            conn.close()
        ssl = (self.ssl_context or True) if self.scheme == "https" else None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=ssl), self.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise _NotSent(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__) from None
        return _AsyncConnection(reader, writer)

    async def close(self) -> None:
        """Close the kept-alive connections (the publisher stays usable)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def __aenter__(self) -> "AsyncPublisher":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


# --- the subscriber ---------------------------------------------------------------------------------------

TokenSource = Union[str, Callable[[], Union[str, Awaitable[str]]]]
StateCallback = Callable[[str, Dict[str, Any]], Any]

CONNECTING, OPEN, RECONNECTING, CLOSED = "connecting", "open", "reconnecting", "closed"
#: Close codes after which reconnecting with the same token cannot help: authentication failed
#: and force disconnect. The subscriber reconnects only if its token function gives a new token.
FINAL_CLOSE_CODES = (4001, 4003)
#: HTTP statuses of a refused upgrade that a retry cannot fix (403: Origin not allowed).
FINAL_HTTP_STATUSES = (400, 401, 403, 404, 405, 426)

_END = object()


class AuthenticationFailed(ClientError):
    """The server refused the token (4001) and no new token was to be had."""


class SubscribeTimeout(ClientError, asyncio.TimeoutError):
    """No ``page_add`` came for a subscription: the page type is unknown, access was denied or a
    required parameter is missing (the server does not answer those), or the server is away."""


def page_key(page: str, params: Mapping[str, Any]) -> Tuple[str, str]:
    """A hashable name of a subscription."""
    return page, json.dumps(dict(params), sort_keys=True, separators=(",", ":"), default=str)


def _matches(sent: Mapping[str, Any], echoed: Mapping[str, Any]) -> bool:
    """Whether the ``parameters`` of a ``page_add``/``page_discard`` answer those sent (the server
    echoes the declared parameters only, a missing one as null)."""
    return all(sent.get(name) == value for name, value in echoed.items())


class Positions:
    """The recovery hook (protocol extension, see issue "presence and recovery"): the last stream
    position seen per page, sent back as ``since`` when resubscribing after a reconnect.

    A message carries ``"position": {"epoch": E, "offset": N}`` only on a connection opened with
    ``positions=1``; a ``page_add`` may carry the ``position`` of the page. The page of a message
    is found by its epoch (learned from ``page_add``), else by the page's parameters in the
    message (``page``/``parameters`` keys, or e.g. ``table_id``; the most specific page wins),
    else when only one page is
    subscribed. Without positions nothing is stored and nothing is sent.
    """

    def __init__(self) -> None:
        self.by_page: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self._epochs: Dict[str, Tuple[str, str]] = {}

    @staticmethod
    def _valid(position: Any) -> Optional[Dict[str, Any]]:
        if (isinstance(position, dict) and isinstance(position.get("epoch"), str)
                and isinstance(position.get("offset"), int) and not isinstance(position.get("offset"), bool)):
            return position
        return None

    def on_page_add(self, key: Tuple[str, str], frame: Mapping[str, Any]) -> None:
        position = self._valid(frame.get("position"))
        if position is not None:
            self.by_page[key] = {"epoch": position["epoch"], "offset": position["offset"]}
            self._epochs[position["epoch"]] = key

    def on_message(self, message: Mapping[str, Any], pages: Mapping[Tuple[str, str], Dict[str, Any]]) -> None:
        position = self._valid(message.get("position"))
        if position is None:
            return
        key = self._epochs.get(position["epoch"])
        if key is None:
            key = self._page_of(message, pages)
            if key is None:
                return
            self._epochs[position["epoch"]] = key
        self.by_page[key] = {"epoch": position["epoch"], "offset": position["offset"]}

    @staticmethod
    def _page_of(message: Mapping[str, Any], pages: Mapping[Tuple[str, str], Dict[str, Any]]
                 ) -> Optional[Tuple[str, str]]:
        if isinstance(message.get("page"), str) and isinstance(message.get("parameters"), dict):
            for key, params in pages.items():
                if key[0] == message["page"] and _matches(params, message["parameters"]):
                    return key
        candidates = [key for key, params in pages.items()
                      if params and all(message.get(name) == value for name, value in params.items())]
        if candidates:  # the most specific page: a row (table_id, row_id) before its table
            most = max(len(pages[key]) for key in candidates)
            candidates = [key for key in candidates if len(pages[key]) == most]
        if len(candidates) == 1:
            return candidates[0]
        if len(pages) == 1:
            return next(iter(pages))
        return None

    def since(self, key: Tuple[str, str]) -> Optional[Dict[str, Any]]:
        return self.by_page.get(key)

    def forget(self, key: Tuple[str, str]) -> None:
        self.by_page.pop(key, None)


class Subscriber:
    """A WebSocket client of tornado-rt with automatic reconnects (asyncio; the ``client`` extra).

    ``url``: the WebSocket endpoint, ``ws://host:port/ws/core/``. ``token``: a JWT (or
    ``"anonymous"``), or a function (sync or async) returning one; the function is called for
    every connection attempt, so it can hand out a fresh token.

    ::

        async with Subscriber("ws://127.0.0.1:8000/ws/core/", token=get_token) as sub:
            await sub.subscribe("table", table_id=10)
            async for message in sub:
                print(message)

    Iterating yields every message of the server except the ``authentication`` answer and the
    ``page_add``/``page_discard`` answers to this client's own subscribe/unsubscribe (which
    :meth:`subscribe` and :meth:`unsubscribe` return). A ``page_discard`` the server sends by
    itself (access revoked) is yielded and the page is forgotten. The iteration ends when the
    subscriber is closed: by :meth:`close`, or finally by the server (see below).

    Reconnects: any drop (server restart, network, 1001, 4009, ...) is followed by new
    connection attempts with jittered exponential backoff (``min_delay`` doubling up to
    ``max_delay``), then every page is subscribed again. Close codes 4001 (authentication
    failed) and 4003 (force disconnect) are final unless the token function gives a token that
    differs from the last one; a refused upgrade with 400/401/403/404 is final too.
    :attr:`close_code` tells why it closed.

    ``on_state(state, info)`` (sync or async) is called with ``connecting``, ``open``,
    ``reconnecting`` (``info["delay"]``, ``info["close_code"]``) and ``closed``
    (``info["close_code"]``, ``info["reason"]``). :attr:`web_socket_id` is the id of the current
    connection (None between connections), to send as the ``WebSocketId`` header of a publish.

    ``positions=True`` asks for the recovery extension (``positions=1``; ``since`` on
    resubscribe, see :class:`Positions`). It needs a server that implements the extension.
    """

    def __init__(self, url: str, token: TokenSource, *, on_state: Optional[StateCallback] = None,
                 min_delay: float = 0.5, max_delay: float = 30.0, open_timeout: float = DEFAULT_TIMEOUT,
                 subscribe_timeout: float = DEFAULT_TIMEOUT, positions: bool = False,
                 headers: Optional[Mapping[str, str]] = None, origin: Optional[str] = None,
                 max_size: Optional[int] = 64 * 1024 * 1024, ping_interval: Optional[float] = 20.0):
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"the WebSocket URL must look like ws://127.0.0.1:8000/ws/core/, got {url!r}")
        if not (isinstance(token, str) or callable(token)):
            raise TypeError("token must be a string or a function returning one")
        if min_delay <= 0 or max_delay < min_delay:
            raise ValueError("min_delay must be positive and max_delay at least min_delay")
        self.url = url
        self._token_source = token
        self._on_state = on_state
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.open_timeout = open_timeout
        self.subscribe_timeout = subscribe_timeout
        self.positions_enabled = positions
        self.headers = dict(headers or {})
        self.origin = origin
        self.max_size = max_size
        self.ping_interval = ping_interval
        #: ``connecting``, ``open``, ``reconnecting`` or ``closed`` (also before :meth:`connect`).
        self.state = CLOSED
        #: The ``web_socket_id`` of the current connection, None between connections.
        self.web_socket_id: Optional[str] = None
        #: Close code and reason of the last connection (after a final close: why it ended).
        self.close_code: Optional[int] = None
        self.close_reason: Optional[str] = None
        #: How many connections were opened (1 + successful reconnects).
        self.connections = 0
        #: The recovery bookkeeping (used only with ``positions=True``).
        self.positions = Positions()
        self._pages: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self._page_names: Dict[Tuple[str, str], str] = {}
        self._adding: Dict[Tuple[str, str], List[asyncio.Future]] = {}
        self._removing: Dict[Tuple[str, str], List[asyncio.Future]] = {}
        self._unacked: set = set()
        self._synced = asyncio.Event()
        self._opened: Optional[asyncio.Future] = None
        self._messages: asyncio.Queue = asyncio.Queue()
        self._ws: Any = None
        self._task: Optional[asyncio.Task] = None
        self._closing = False
        self._token: Optional[str] = None
        self._ended = False
        self._finished = False

    # -- public API ----------------------------------------------------------------------------------
    async def connect(self) -> "Subscriber":
        """Start the connection loop and wait until the first connection is open. Raises
        :class:`AuthenticationFailed` (4001 with no new token) or :class:`ConnectionFailed` when
        the subscriber closed before opening (refused upgrade, force disconnect, :meth:`close`)."""
        if self._task is None:
            self._closing = False
            self._opened = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._run(), name="tornado-rt subscriber")
        assert self._opened is not None
        await asyncio.shield(self._opened)
        return self

    async def subscribe(self, page: str, timeout: Optional[float] = None, **params: Any) -> Dict[str, Any]:
        """Subscribe to ``page`` with its parameters and wait for the ``page_add`` (returned).
        The page is subscribed again after every reconnect. Raises :class:`SubscribeTimeout`
        (and forgets the page) when no ``page_add`` comes within ``timeout`` (default
        ``subscribe_timeout``)."""
        if self._finished:
            raise ConnectionFailed(f"the subscriber is closed ({self.close_reason})", sent=False)
        key = page_key(page, params)
        self._pages[key] = dict(params)
        self._page_names[key] = page
        future = asyncio.get_running_loop().create_future()
        self._adding.setdefault(key, []).append(future)
        self._unacked.add(key)
        self._synced.clear()
        if self._ws is not None and self.state == OPEN:
            await self._send_subscribe(key)
        try:
            return await asyncio.wait_for(future, self.subscribe_timeout if timeout is None else timeout)
        except asyncio.TimeoutError:
            self._forget(key)
            raise SubscribeTimeout(f"no page_add for {page} {params}: unknown page, access denied, a required "
                                   "parameter missing, or the server is away") from None

    async def unsubscribe(self, page: str, timeout: Optional[float] = None, **params: Any) -> None:
        """Unsubscribe (the page is not subscribed again after a reconnect). Waits for the
        server's ``page_discard`` when connected."""
        key = page_key(page, params)
        self._forget(key)
        if self._ws is None or self.state != OPEN:
            return
        future = asyncio.get_running_loop().create_future()
        self._removing.setdefault(key, []).append(future)
        await self._send({"remove_page": page, **params})
        try:
            await asyncio.wait_for(future, self.subscribe_timeout if timeout is None else timeout)
        except asyncio.TimeoutError:
            pass  # the connection dropped meanwhile; the page is forgotten all the same

    @property
    def pages(self) -> List[Tuple[str, Dict[str, Any]]]:
        """The subscribed pages: ``[(page, params)]``."""
        return [(self._page_names[key], dict(params)) for key, params in self._pages.items()]

    async def ready(self, timeout: Optional[float] = None) -> None:
        """Wait until a connection is open and every page has its ``page_add`` on it (after a
        reconnect: resubscribed). It describes the connection as this client knows it: right
        after a drop that has not been read yet it still returns at once (wait for the ``open``
        state of ``on_state`` to follow a reconnect)."""
        await asyncio.wait_for(self._synced.wait(), timeout)

    async def receive(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The next message; raises :class:`StopAsyncIteration` once closed."""
        if self._ended:
            raise StopAsyncIteration
        item = await asyncio.wait_for(self._messages.get(), timeout)
        if item is _END:
            self._ended = True
            raise StopAsyncIteration
        return item  # type: ignore[no-any-return,unused-ignore]

    def __aiter__(self) -> AsyncIterator[Dict[str, Any]]:
        return self

    async def __anext__(self) -> Dict[str, Any]:
        return await self.receive()

    async def close(self) -> None:
        """Close the connection and stop reconnecting; the iteration ends."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            await ws.close()
        if self._task is not None and not self._task.done():
            try:  # the loop sees the close and ends; between connections it is cancelled
                if ws is None:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(asyncio.shield(self._task), 1.0)
            except asyncio.TimeoutError:
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
        elif self._task is None:
            self._finish(None, "closed by the client")

    async def wait_closed(self) -> None:
        """Wait until the subscriber has closed for good (no more reconnects)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def __aenter__(self) -> "Subscriber":
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- the connection loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            self._finish(self.close_code, "closed by the client")
            raise
        except Exception as exc:  # never expected; end cleanly rather than hang the iterator
            log.exception("subscriber loop failed")
            self._finish(self.close_code, f"internal error: {exc}")

    async def _loop(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

        attempt = 0  # failed attempts since the last open connection (the backoff exponent)
        finals = 0  # 4001/4003 closes in a row, each followed by a new token
        retried_4001 = False  # the current token was fetched because the previous one got 4001
        token: Optional[str] = None
        while not self._closing:
            if self.connections == 0 and attempt == 0 and finals == 0:
                await self._set_state(CONNECTING, {"attempt": 0})
            if token is None:
                try:
                    token = await self._fresh_token()
                except Exception as exc:
                    log.warning("the token function failed: %s", exc)
            if token is not None:
                self._token = token
                try:
                    ws = await connect(self._ws_url(token), open_timeout=self.open_timeout, proxy=None,
                                       additional_headers=self.headers or None,
                                       origin=self.origin,  # type: ignore[arg-type]
                                       max_size=self.max_size, ping_interval=self.ping_interval,
                                       user_agent_header=USER_AGENT)
                except InvalidStatus as exc:
                    status = exc.response.status_code
                    if status in FINAL_HTTP_STATUSES:
                        self._finish(None, f"the server refused the connection with HTTP {status}",
                                     ConnectionFailed(f"HTTP {status} from {self.url}", sent=True))
                        return
                    log.debug("connection attempt to %s refused with HTTP %d", self.url, status)
                except (OSError, asyncio.TimeoutError, InvalidHandshake) as exc:
                    log.debug("connection attempt to %s failed: %s", self.url, exc)
                else:
                    self._ws = ws
                    code, reason, authenticated = await self._session(ws, ConnectionClosed)
                    self._ws = None
                    self.web_socket_id = None
                    self._synced.clear()
                    self.close_code, self.close_reason = code, reason
                    if self._closing:
                        break
                    if authenticated:
                        attempt = 0
                        retried_4001 = False
                    if code in FINAL_CLOSE_CODES:
                        # Final unless a new token is to be had; a token fetched after a 4001 that
                        # fails again is final too (no loop of bad tokens).
                        fresh = None
                        if callable(self._token_source) and not (code == 4001 and retried_4001):
                            try:
                                fresh = await self._fresh_token()
                            except Exception as exc:
                                log.warning("the token function failed after close %s: %s", code, exc)
                        if fresh is None or fresh == self._token:
                            what = "authentication failed" if code == 4001 else "force disconnect"
                            error = (AuthenticationFailed(f"the server refused the token (close {code})")
                                     if code == 4001 else ConnectionFailed(f"{what} (close {code})", sent=True))
                            self._finish(code, reason or what, error)
                            return
                        token = fresh
                        retried_4001 = code == 4001
                        finals += 1
                        if finals == 1:
                            await self._set_state(RECONNECTING, {"attempt": 0, "delay": 0.0, "close_code": code})
                            continue  # at once with the new token
                    else:
                        finals = 0
                        token = None
            else:
                token = None
            delay = _backoff(max(attempt, finals - 1), self.min_delay, self.max_delay)
            attempt += 1
            await self._set_state(RECONNECTING, {"attempt": attempt, "delay": delay, "close_code": self.close_code})
            await asyncio.sleep(delay)
        self._finish(self.close_code, "closed by the client")

    async def _session(self, ws: Any, closed_exc: Type[BaseException]) -> Tuple[Optional[int], str, bool]:
        """One connection: authentication, resubscription, then every frame. Returns the close
        code and reason, and whether it authenticated."""
        authenticated = False
        try:
            async for raw in ws:
                try:
                    frame = json.loads(raw)
                except ValueError:
                    log.warning("ignoring a frame that is not JSON")
                    continue
                if not isinstance(frame, dict):
                    continue
                kind = frame.get("type")
                if kind == "authentication" and not authenticated:
                    if frame.get("success") is not True:
                        continue  # the server closes with 4001 next
                    authenticated = True
                    self.web_socket_id = frame.get("web_socket_id")
                    self.connections += 1
                    await self._set_state(OPEN, {"web_socket_id": self.web_socket_id})
                    if self._opened is not None and not self._opened.done():
                        self._opened.set_result(None)
                    await self._resubscribe()
                    continue
                self._dispatch(frame)
        except closed_exc:
            pass
        return ws.close_code, ws.close_reason or "", authenticated

    async def _resubscribe(self) -> None:
        self._unacked = set(self._pages)
        if not self._unacked:
            self._synced.set()
        for key in list(self._pages):
            await self._send_subscribe(key)

    async def _send_subscribe(self, key: Tuple[str, str]) -> None:
        frame: Dict[str, Any] = {"page": self._page_names[key], **self._pages[key]}
        if self.positions_enabled:
            since = self.positions.since(key)
            if since is not None:
                frame["since"] = since
        await self._send(frame)

    async def _send(self, frame: Mapping[str, Any]) -> None:
        ws = self._ws
        if ws is None:
            return
        try:
            await ws.send(json.dumps(frame, separators=(",", ":")))
        except Exception as exc:  # the connection dropped: the loop reconnects and resubscribes
            log.debug("send failed: %s", exc)

    def _dispatch(self, frame: Dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind in ("page_add", "page_discard") and isinstance(frame.get("page"), str):
            echoed = frame.get("parameters")
            params: Dict[str, Any] = echoed if isinstance(echoed, dict) else {}
            key = self._find(frame["page"], params)
            if kind == "page_add" and key is not None:
                self.positions.on_page_add(key, frame)
                for future in self._adding.pop(key, []):
                    if not future.done():
                        future.set_result(frame)
                self._unacked.discard(key)
                if not self._unacked and self.state == OPEN:
                    self._synced.set()
                if frame.get("recovered") is False:
                    self._messages.put_nowait(frame)  # the application must refetch this page
                return
            if kind == "page_add":
                return  # only ever an answer to this client: a page unsubscribed meanwhile
            if kind == "page_discard":
                waiting: List[asyncio.Future] = []
                for removed in list(self._removing):
                    if removed[0] == frame["page"] and _matches(json.loads(removed[1]), params):
                        waiting += self._removing.pop(removed)
                if waiting:
                    for future in waiting:
                        if not future.done():
                            future.set_result(frame)
                    return
                if key is not None:
                    self._forget(key)  # revoked by the server: do not subscribe again
        if self.positions_enabled:
            self.positions.on_message(frame, self._pages)
        self._messages.put_nowait(frame)

    def _find(self, page: str, params: Mapping[str, Any]) -> Optional[Tuple[str, str]]:
        exact = page_key(page, params)
        if exact in self._pages:
            return exact
        for key, sent in self._pages.items():
            if key[0] == page and _matches(sent, params):
                return key
        return None

    def _forget(self, key: Tuple[str, str]) -> None:
        self._pages.pop(key, None)
        self._page_names.pop(key, None)
        self.positions.forget(key)
        self._unacked.discard(key)
        for future in self._adding.pop(key, []):
            if not future.done():
                future.cancel()
        if not self._unacked and self.state == OPEN:
            self._synced.set()

    async def _fresh_token(self) -> str:
        source = self._token_source
        if isinstance(source, str):
            return source
        value = source()
        if inspect.isawaitable(value):
            value = await value
        if not isinstance(value, str) or not value:
            raise TypeError(f"the token function must return a non-empty string, got {type(value).__name__}"
                            + (" (empty)" if isinstance(value, str) else ""))
        return value

    def _ws_url(self, token: str) -> str:
        url = f"{self.url}{'&' if '?' in self.url else '?'}jwt_token={quote(token, safe='')}"
        if self.positions_enabled:
            url += "&positions=1"
        return url

    async def _set_state(self, state: str, info: Dict[str, Any]) -> None:
        self.state = state
        if self._on_state is None:
            return
        try:
            result = self._on_state(state, info)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_state callback failed")

    def _finish(self, code: Optional[int], reason: str, error: Optional[BaseException] = None) -> None:
        if self._finished:
            return
        self._finished = True
        self.close_code = code
        self.close_reason = reason
        self.state = CLOSED
        self.web_socket_id = None
        self._synced.clear()
        if self._on_state is not None:
            try:
                result = self._on_state(CLOSED, {"close_code": code, "reason": reason})
                if inspect.isawaitable(result):
                    asyncio.ensure_future(result)
            except Exception:
                log.exception("on_state callback failed")
        if self._opened is not None and not self._opened.done():
            self._opened.set_exception(error or ConnectionFailed(f"closed before opening: {reason}", sent=False))
            self._opened.exception()  # retrieved: no "never retrieved" warning if nobody awaits it
        for futures in list(self._adding.values()) + list(self._removing.values()):
            for future in futures:
                if not future.done():
                    future.cancel()
        self._adding.clear()
        self._removing.clear()
        self._messages.put_nowait(_END)
