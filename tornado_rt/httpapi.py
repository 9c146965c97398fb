"""The HTTP server API of the standalone server (docs/server-api.md).

``POST /api/publish``, ``POST /api/disconnect``, ``POST /api/revoke``, ``PUT``/``GET
/api/directory`` (and its incremental endpoints), ``GET /api/stats`` (and ``/api/stats/live``), ``GET /api/types``,
``GET /api/openapi.json``, ``GET /api/docs``, ``GET /healthz``, ``GET /metrics`` and the admin page ``GET /admin``, beside the
WebSocket endpoint of the same :class:`~tornado_rt.RealtimeServer`. There is no second routing path: an HTTP publish is turned
into envelopes by :mod:`tornado_rt.envelope` exactly as a Python publish is, and handed to
``server.submit``.

:func:`make_app` assembles the Tornado application; the command line (:mod:`tornado_rt.cli`) uses
it and so can tests or an embedding program.

Rules every endpoint follows:

* Under ``/api/``: ``Authorization: Bearer <api key>``, compared in constant time with every
  configured key; missing or wrong gives 401 at the request head, before the body is read (the
  handlers stream bodies: ``prepare`` runs before any of it arrives). A valid key also releases
  the connection from ``max_unauthenticated_per_address`` (:func:`~tornado_rt.mark_authenticated`).
  Public (no key): the descriptions of the API, ``GET /api/types``, ``GET /api/openapi.json`` and
  ``GET /api/docs`` (they describe what any client of the protocol must know anyway and hold no
  data).
* A method that takes no body (every ``GET`` and ``DELETE``, the bodyless ``PUT``) refuses one
  announced at the head with 413 naming ``Content-Length`` / ``Transfer-Encoding`` and never
  buffers it (:class:`~tornado_rt.GuardedHTTPServer` refuses it even before the application).
* JSON in (``Content-Type: application/json``, else 415), JSON out. Errors are
  ``{"error": "<sentence>", "field": "<dotted path or null>"}`` with 400 (any
  :class:`~tornado_rt.errors.FieldError` a handler raises: a refused publish, directory change or
  id), 401, 404, 405, 413
  (body over ``max_body_size``, checked on ``Content-Length`` before reading and while reading a
  chunked body), 415, and 503 when the broker cannot take a publish.
* The access log never holds a JWT or an API key: headers are never logged and the query values
  that may carry a token are redacted.
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import time
from typing import Any, Awaitable, Dict, Iterable, Iterator, List, Optional, Sequence

import tornado
from tornado import httputil
from tornado.http1connection import HTTP1Connection
from tornado.ioloop import IOLoop
from tornado.log import gen_log
from tornado.web import Application, HTTPError, RequestHandler, stream_request_body

from . import __version__
from .admin import ADMIN_PAGE, RateSampler, live_stats
from .broker import BrokerUnavailable
from .envelope import Envelope, PublishError, individual_envelope, message_envelope
from .errors import FieldError, require_id, require_ids
from .listener import mark_authenticated
from .policy import Directory
from . import refusals, transport
from .proxy import apply_forwarded
from .server import RealtimeServer, web_socket_id_from_headers, web_socket_id_from_request
from .settings import Standalone

log = logging.getLogger("tornado_rt.httpapi")
access_log = logging.getLogger("tornado.access")

#: Default limit of a request body: the ``max_body_size`` setting's (10 MiB).
DEFAULT_MAX_BODY_SIZE: int = Standalone.max_body_size

#: Buckets of the publish-to-write latency histogram, in seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0)

def log_request(handler: RequestHandler) -> None:
    """The application's ``log_function``: one access-log line per request, credentials never
    included (no headers at all; token-like query values redacted)."""
    _log_access(handler.get_status(), handler.request)


def _log_access(status: int, request: httputil.HTTPServerRequest) -> None:
    """:func:`log_request`'s line from the status and the request (the publish fast path has no
    handler)."""
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if not access_log.isEnabledFor(level):
        return  # e.g. --log-level warning: no line, so no redaction or formatting either
    access_log.log(level, "%d %s %.2fms", status, transport.request_summary(request), 1000.0 * request.request_time())


class ApiError(HTTPError, FieldError):
    """An error answered as ``{"error": message, "field": field}`` with ``status`` (any other
    :class:`~tornado_rt.errors.FieldError` raised by a handler is answered the same way with 400)."""

    def __init__(self, status: int, message: str, field: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        HTTPError.__init__(self, status)
        self.message = message
        self.field = field
        self.headers = headers or {}


# --- metrics ----------------------------------------------------------------------------------------

class ServerCollector:
    """A Prometheus collector reading the server's plain counters at scrape time, so that the hot
    path pays nothing for metrics (``Counters`` are dict increments)."""

    def __init__(self, server: RealtimeServer):
        self.server = server

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        server = self.server
        stats = server.stats()
        counters = server.counters
        info = GaugeMetricFamily("tornado_rt_build_info", "tornado-rt version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        for name, key, text in (
            ("tornado_rt_connections", "connections", "Open, authenticated WebSocket connections"),
            ("tornado_rt_authenticated_users", "authenticated_users", "Distinct users connected"),
            ("tornado_rt_anonymous_connections", "anonymous_connections", "Anonymous connections"),
            ("tornado_rt_pages", "pages", "Pages with at least one subscriber"),
            ("tornado_rt_subscriptions", "subscriptions", "Page subscriptions over all connections"),
        ):
            yield GaugeMetricFamily(name, text, value=stats[key])
        broker = broker_health(server)
        connected = GaugeMetricFamily("tornado_rt_broker_connected",
                                      "1 while the broker is reachable (in-process: always), else 0",
                                      labels=["kind"])
        connected.add_metric([broker["kind"]], 1 if broker["connected"] else 0)
        yield connected
        directory = server.directory
        if directory is not None and directory.store is not None:
            yield CounterMetricFamily("tornado_rt_directory_save_failures",
                                      "Directory changes that could not be saved to --directory since start",
                                      value=directory.save_failures)
        webhook = getattr(server, "access_webhook", None)
        if webhook is not None:
            decisions = CounterMetricFamily("tornado_rt_access_webhook_decisions",
                                            "Access webhook decisions since start, by outcome "
                                            "(timeout and error refuse)", labels=["outcome"])
            for outcome, n in sorted(webhook.decisions.items()):
                decisions.add_metric([outcome], n)
            yield decisions
        yield CounterMetricFamily("tornado_rt_connections_opened", "Connections authenticated since start",
                                  value=counters.connections_opened)
        yield CounterMetricFamily("tornado_rt_authentication_failures",
                                  "Connections refused with 4001 since start", value=counters.auth_failures)
        closed = CounterMetricFamily("tornado_rt_connections_closed",
                                     "Connections closed since start, by reason", labels=["reason"])
        for reason, n in sorted(counters.closed.items()):
            closed.add_metric([reason], n)
        yield closed
        published = CounterMetricFamily("tornado_rt_messages_published",
                                        "Messages published since start, by type", labels=["type"])
        for name, n in sorted(counters.published.items()):
            published.add_metric([name], n)
        yield published
        delivered = CounterMetricFamily("tornado_rt_messages_delivered",
                                        "Message copies queued to connections since start, by type",
                                        labels=["type"])
        for name, n in sorted(counters.delivered.items()):
            delivered.add_metric([name], n)
        yield delivered
        refused = CounterMetricFamily(
            "tornado_rt_refusals", "Refusals since the process started, by what was refused (token, "
            "subscription, frame) and the reason code; every refusal counts, logged or not",
            labels=["kind", "reason"])
        for (kind, reason), n in sorted(refusals.REFUSALS.counts().items()):
            refused.add_metric([kind, reason], n)
        yield refused
        bus = server.broker
        yield CounterMetricFamily("tornado_rt_duplicates_dropped",
                                  "Envelopes not delivered because their id was delivered within the "
                                  "dedup window", value=getattr(bus, "duplicates", 0))
        if hasattr(bus, "gaps"):  # the Redis broker
            yield CounterMetricFamily("tornado_rt_redis_gaps",
                                      "Gaps in the Redis stream this process could not replay (each one "
                                      "sends page_discard for every page subscription)", value=getattr(bus, "gaps"))
            yield CounterMetricFamily("tornado_rt_redis_envelopes_lost",
                                      "Envelopes of the Redis stream this process never received (trimmed "
                                      "or deleted before it read them; a lower bound)", value=getattr(bus, "lost", 0))
            yield CounterMetricFamily("tornado_rt_redis_resets",
                                      "Times the Redis stream started over (Redis restarted without "
                                      "persistence, FLUSHALL, the stream deleted)", value=getattr(bus, "resets", 0))
        routing = getattr(bus, "routing_stats", None)
        if routing is not None:  # the Redis broker's routing of page messages (docs/redis.md "Routing")
            for name, (kind, text) in getattr(bus, "ROUTING_METRICS").items():
                family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                yield family(f"tornado_rt_redis_{name}", text, value=routing()[name])


class BatchHistogram:
    """A Prometheus histogram that takes ``n`` equal observations in one step: every envelope of
    a batch has the same publish-to-write latency, and observing a 100,000-envelope batch one by
    one through ``prometheus_client.Histogram`` (a lock per call) held the loop for 100+ ms.
    Plain counters, exposed at scrape time like :class:`ServerCollector`'s."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]):
        self.name = name
        self.documentation = documentation
        self.bounds = sorted(float(b) for b in buckets if b != float("inf")) + [float("inf")]
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n  # the first bucket with value <= le
        self.sum += value * n

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds, self.counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family = HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)
        yield family


class Metrics:
    """The Prometheus registry of one application: the server collector, the publish-to-write
    histogram and the standard process/platform/GC collectors."""

    def __init__(self, server: RealtimeServer):
        from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

        self.registry = CollectorRegistry()
        self.registry.register(ServerCollector(server))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.publish_latency = BatchHistogram(
            "tornado_rt_publish_to_write_seconds",
            "From the HTTP publish handing an envelope to the server until the frames are written "
            "to the sockets of this process (one observation per envelope)",
            LATENCY_BUCKETS)
        self.registry.register(self.publish_latency)

    def observe_publish(self, started: float, envelopes: int) -> None:
        self.publish_latency.observe(time.perf_counter() - started, envelopes)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


# --- shared state and the handler base ---------------------------------------------------------------

class HttpApi:
    """What the handlers of one application share."""

    def __init__(self, server: RealtimeServer, api_keys: Sequence[str], max_body_size: int,
                 metrics: Optional[Metrics]):
        keys = [k for k in api_keys if isinstance(k, str) and k]
        if not keys:
            raise ValueError("the HTTP server API needs at least one non-empty API key")
        if max_body_size <= 0:
            raise ValueError("max_body_size must be positive")
        self.server = server
        self._key_digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]
        self.max_body_size = max_body_size
        self.metrics = metrics
        self.started = time.monotonic()
        #: Requests ``POST /api/publish`` answered on the fast path (:class:`ApiApplication`).
        self.fast_publishes = 0
        #: Messages per second for the admin page, sampled off the hot path (tornado_rt.admin).
        self.sampler = RateSampler(server)

    def authorized(self, header: Optional[str]) -> bool:
        """Whether an ``Authorization`` header names a configured key (constant time: every key
        is compared, over equal-length digests)."""
        if not header:
            return False
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = hashlib.sha256(credentials.strip().encode("utf-8", "replace")).digest()
        found = False
        for digest in self._key_digests:
            found |= hmac.compare_digest(digest, given)
        return found


_METHODS = ("get", "post", "put", "delete", "patch", "head", "options")


def _reason(status_code: int, exc: Any, reason: Optional[str]) -> str:
    """The reason phrase ``RequestHandler.send_error`` sets: the HTTPError's own, else the
    ``reason`` passed to it, else the standard phrase of the status."""
    if isinstance(exc, HTTPError) and exc.reason:
        return exc.reason
    return reason or httputil.responses.get(status_code, "Unknown")


def _unless_answered(method: Any) -> Any:
    @functools.wraps(method)
    def wrapper(self: "ApiHandler", *args: Any) -> Any:
        if self.answered:  # already answered while the body streamed in (413)
            return None
        return method(self, *args)
    return wrapper


@stream_request_body
class ApiHandler(transport.RedactedSummary):
    """Base of every endpoint: key check, method check, content type, body limit, JSON errors."""

    #: Whether the endpoint needs ``Authorization: Bearer <api key>``.
    requires_key = True
    #: Methods that read a JSON body.
    json_methods: Sequence[str] = ()
    _implemented: Optional[List[str]] = None  # implemented_methods(), per class
    #: Whether the answer is finished (set by :meth:`finish`, which every answer goes through).
    answered = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _METHODS:
            if name in cls.__dict__:
                setattr(cls, name, _unless_answered(cls.__dict__[name]))

    def initialize(self, api: HttpApi) -> None:
        self.api = api
        self.server = api.server
        self._chunks: Optional[List[bytes]] = []
        self._size = 0

    @classmethod
    def implemented_methods(cls) -> List[str]:
        """The HTTP methods this handler answers (upper case); computed once per class."""
        methods = cls.__dict__.get("_implemented")
        if methods is None:
            methods = [m.upper() for m in _METHODS if getattr(cls, m) is not getattr(RequestHandler, m)]
            cls._implemented = methods
        return list(methods)

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        apply_forwarded(self.request, self.api.server.settings.trusted_proxies)
        self._lift_connection_limit()
        if not self.api.sampler.running:
            self.api.sampler.start()  # make_app off the loop (an embedder): start on first request
        if self.requires_key and not self.api.authorized(self.request.headers.get("Authorization")):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <api key>'",
                           headers={"WWW-Authenticate": 'Bearer realm="tornado-rt"'})
        if self.requires_key:
            mark_authenticated(self.request)  # no longer counts against max_unauthenticated_per_address
        method = self.request.method or ""
        allowed = self.implemented_methods()
        if method not in allowed:
            raise ApiError(405, f"{method} is not allowed on {self.request.path}; use {' or '.join(allowed)}",
                           headers={"Allow": ", ".join(allowed)})
        if method.lower() in self.json_methods:
            content_type = self.request.headers.get("Content-Type", "")
            media = content_type.split(";", 1)[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                raise ApiError(415, "the body must be JSON: send the header 'Content-Type: application/json'")
        length = self.request.headers.get("Content-Length")
        if method.lower() not in self.json_methods:
            # No body is read here: refuse one at the head (GuardedHTTPServer does the same
            # before the application; this covers an embedder's plain HTTPServer).
            if "Transfer-Encoding" in self.request.headers:
                raise ApiError(413, f"{method} {self.request.path} takes no request body; this request "
                                    "announces one (Transfer-Encoding)", "Transfer-Encoding")
            if length is not None and length.strip() != "0":
                raise ApiError(413, f"{method} {self.request.path} takes no request body; this request "
                                    f"announces one (Content-Length: {length.strip()[:20]})", "Content-Length")
        if length is not None:
            if not (length.strip().isascii() and length.strip().isdigit()):  # "²".isdigit(), int("²") fails
                raise ApiError(400, "Content-Length is not a number", "Content-Length")
            if int(length) > self.api.max_body_size:
                raise ApiError(413, f"the body is larger than the limit of {self.api.max_body_size} bytes")

    def _lift_connection_limit(self) -> None:
        # The body limit is enforced by this class, with a JSON 413 (Tornado's own limit answers a
        # bare 400). An early answer closes the connection, so an oversized body is not read.
        connection = self.request.connection
        if isinstance(connection, HTTP1Connection):
            connection.set_max_body_size(1 << 62)

    def data_received(self, chunk: bytes) -> None:
        if self.answered or self._chunks is None:
            return
        if (self.request.method or "").lower() not in self.json_methods:
            return  # never buffered (refused at the head when announced)
        self._size += len(chunk)
        if self._size > self.api.max_body_size:
            self._chunks = None
            self.fail(413, f"the body is larger than the limit of {self.api.max_body_size} bytes")
            return
        self._chunks.append(chunk)

    # --- helpers for the endpoints ---------------------------------------------------------------
    def body_text(self) -> str:
        """The body as text (400 when empty or not UTF-8); the raw chunks are released."""
        data = b"".join(self._chunks or ())
        self._chunks = []
        if not data.strip():
            raise ApiError(400, "the body is empty; send a JSON document")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "the body is not valid UTF-8") from None

    def json_body(self) -> Any:
        text = self.body_text()
        with json_errors():
            return json.loads(text, parse_constant=_reject_constant)

    def json_object(self, allowed: Sequence[str], required: Sequence[str] = ()) -> Dict[str, Any]:
        """The body as a JSON object with only ``allowed`` keys and every ``required`` one."""
        body = self.json_body()
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        for key in body:
            if key not in allowed:
                raise ApiError(400, f"unexpected key {key!r}; allowed: {', '.join(allowed)}", key)
        for key in required:
            if key not in body:
                raise ApiError(400, f"{key!r} is required", key)
        return body

    def reply(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(_encode(obj))

    def fail(self, status: int, message: str, field: Optional[str] = None) -> None:
        """Answer an error now (used where raising is not possible)."""
        self.clear()
        self.set_header("Connection", "close")
        self.reply({"error": message, "field": field}, status)

    def directory(self) -> Directory:
        directory = self.server.directory
        if directory is None:
            raise ApiError(404, "this server's access policy is not the in-memory directory")
        return directory

    # --- error output and logging ----------------------------------------------------------------
    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            message, field = exc.message, exc.field
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, FieldError):  # a refused value: the client's mistake, named
            self.set_status(400)
            message, field = exc.message, exc.field
        elif status_code == 405:
            message, field = f"{self.request.method} is not a supported method", None
        elif status_code >= 500:
            message, field = "internal server error", None
        else:  # the reason send_error gave the status line (Tornado's rule, from public values)
            message, field = _reason(status_code, exc, kwargs.get("reason")), None
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(_encode({"error": message, "field": field}))

    def finish(self, chunk: Any = None) -> "asyncio.Future[None]":
        self.answered = True
        return super().finish(chunk)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, (HTTPError, FieldError)):
            return  # the access log has the status; the client has the sentence
        log.error("uncaught exception in %s", self.request_summary(), exc_info=(typ, value, tb))


#: The answers' encoder, built once: ``json.dumps`` with any option builds a new JSONEncoder per
#: call, a measurable part of a one-message publish. Same output as before, byte for byte.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@contextlib.contextmanager
def json_errors() -> Iterator[None]:
    """Turn the JSON parser's errors into the API's 400 answers."""
    try:
        yield
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None
    except ApiError:
        raise
    except ValueError as exc:  # json.JSONDecodeError, or a constant (NaN, Infinity) refused
        if isinstance(exc, FieldError):
            raise
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None


_skip_whitespace_re = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, as the json module skips it


def _skip_whitespace(text: str, pos: int) -> int:
    match = _skip_whitespace_re.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _array_items(text: str, start: int) -> Iterator[Any]:
    """The elements of the JSON array at ``text[start]`` (a ``[``), parsed one at a time with the
    json module's own scanner, so that a huge array can be worked through in slices. Accepts and
    refuses exactly what ``json.loads`` does (whitespace, trailing data); the errors are
    ``json.JSONDecodeError`` with the json module's wording and position."""
    scan = _DECODER.scan_once  # type: ignore[attr-defined]  # the C scanner json.loads uses
    skip = _skip_whitespace
    pos = skip(text, start + 1)
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                value, pos = scan(text, pos)
            except StopIteration as err:
                raise json.JSONDecodeError("Expecting value", text, err.value) from None
            yield value
            pos = skip(text, pos)
            if text.startswith("]", pos):
                pos += 1
                break
            if not text.startswith(",", pos):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            pos = skip(text, pos + 1)
    end = skip(text, pos)
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)


# --- endpoints ----------------------------------------------------------------------------------------

class PublishHandler(ApiHandler):
    """``POST /api/publish``: one envelope or an array of them, all validated before any is
    published; answers once this process's connections have them queued."""

    json_methods = ("post",)
    MESSAGE_KEYS = ("message", "to", "ignore_web_socket_id", "exclude_user_ids", "id")
    INDIVIDUAL_KEYS = ("individual", "ignore_web_socket_id", "id")

    async def post(self) -> None:
        text = self.body_text()
        sender = web_socket_id_from_request(self)
        start = _skip_whitespace(text, 0)
        if text.startswith("[", start):
            envelopes = await self._batch(text, start, sender)
        else:
            with json_errors():
                body = _DECODER.decode(text)  # json.loads(text, parse_constant=...) without a new decoder
            envelopes = [self._envelope(body, "", sender)]
        del text
        started = time.perf_counter()
        try:
            delivered = await self.server.submit(envelopes)
        except BrokerUnavailable as exc:
            raise ApiError(503, f"the broker cannot take the publish: {exc}") from None
        api = self.api
        api.fast_publishes += 1
        metrics = api.metrics
        published = len(envelopes)
        if metrics is not None and envelopes:
            # After the hub's flush, which delivery scheduled before it (now when none is pending).
            self.server.hub.after_flush(metrics.observe_publish, started, published)
        self.reply({"published": published, "delivered": delivered})
        if published > self.server.publish_slice:  # freeing 100,000 envelopes at once takes ~25 ms
            slicer = self.server.slicer()
            while envelopes:
                del envelopes[-slicer.size:]
                await slicer.pause()

    async def _batch(self, text: str, start: int, sender: Optional[str]) -> List[Any]:
        """Parse and validate an array of envelopes one element at a time, in slices that yield
        to the loop (a 9 MiB batch takes about a second: issue 10, item 9). Each parsed element is
        turned into its envelope at once and dropped. The whole batch is checked before anything
        is published: the first invalid envelope is remembered, the rest is still parsed (a JSON
        syntax error anywhere in the body wins, as when the body was parsed in one go), and the
        request is refused with nothing published."""
        slicer = self.server.slicer()
        envelopes: List[Any] = []
        refused: Optional[FieldError] = None
        with json_errors():
            for i, item in enumerate(_array_items(text, start)):
                if refused is None:
                    try:
                        envelopes.append(self._envelope(item, f"[{i}].", sender))
                    except FieldError as exc:
                        refused, envelopes = exc, []
                if slicer.due():
                    await slicer.pause()
        if refused is not None:
            raise refused
        return envelopes

    def _envelope(self, item: Any, prefix: str, sender: Optional[str]) -> Any:
        return publish_envelope(self.server.registry, item, prefix, sender)


def publish_envelope(registry: Any, item: Any, prefix: str, sender: Optional[str]) -> Envelope:
    """One envelope of ``POST /api/publish`` (the parsed JSON ``item``), validated; ``prefix``
    (``""`` or ``"[i]."``) prefixes the error fields; ``sender``: the request's ``WebSocketId``."""
    if not isinstance(item, dict):
        raise PublishError("an envelope must be a JSON object", prefix.rstrip(".") or None)
    allowed: Sequence[str]
    if "individual" in item:
        individual, allowed = True, PublishHandler.INDIVIDUAL_KEYS
    else:
        individual, allowed = False, PublishHandler.MESSAGE_KEYS
    if len(item) > 1 or "message" not in item:
        for key in item:
            if key not in allowed:
                hint = " (an envelope has either message and to, or individual)" if individual else ""
                raise PublishError(f"unexpected key {key!r} in the envelope{hint}", prefix + key)
    else:  # the common case, {"message": {...}}: nothing else to look at
        return message_envelope(registry, item["message"], None, sender, None, prefix)
    ignore = item["ignore_web_socket_id"] if "ignore_web_socket_id" in item else sender
    if individual:
        return individual_envelope(registry, item["individual"], ignore, prefix, id=item.get("id"))
    if "message" not in item:
        raise PublishError("the envelope needs a message (or individual payloads)", prefix + "message")
    exclude = item.get("exclude_user_ids")
    if exclude is not None and not isinstance(exclude, list):
        raise PublishError("exclude_user_ids must be a list of user ids", prefix + "exclude_user_ids")
    return message_envelope(registry, item["message"], item.get("to"), ignore, exclude, prefix,
                            id=item.get("id"))


# --- the publish fast path ------------------------------------------------------------------------------

class ApiApplication(Application):
    """The application of :func:`make_app`: a Tornado ``Application`` that serves ``POST
    /api/publish`` on a fast path (through ``get_handler_delegate``, public Tornado API).

    Why: a one-message publish through :class:`PublishHandler` (a ``@stream_request_body``
    handler, so that the key and the length are checked before the body is read) costs several
    loop turns (the handler's coroutine runs ``prepare`` one turn after the head, the body wakes
    it again) plus the handler's own set-up, more than parsing, validating and publishing the
    message. :class:`_FastPublish` answers the common request, an authorized ``POST`` of a JSON
    body with a ``Content-Length`` of at most :attr:`max_fast_body` bytes holding valid envelopes,
    in the loop turn that reads its last byte, with the same answer and the same access-log line.
    Every other request (a wrong key, another method, another content type, a chunked or larger
    body, anything invalid in the body) is handed to :class:`PublishHandler` as before, so every
    error answer comes from one place; a body refused only once it was read is replayed into the
    handler (which parses it again: errors only).
    """

    #: The largest body answered on the fast path (a batch of 100 envelopes of ~570 bytes is 57
    #: kB): at most a few milliseconds of loop time, the slicing budget's order of magnitude.
    #: Larger bodies go through :class:`PublishHandler`, which parses and publishes in slices.
    max_fast_body = 64 * 1024

    def get_handler_delegate(self, request: httputil.HTTPServerRequest, target_class: Any,  # type: ignore[override]
                             target_kwargs: Optional[Dict[str, Any]] = None, path_args: Optional[List[bytes]] = None,
                             path_kwargs: Optional[Dict[str, bytes]] = None) -> httputil.HTTPMessageDelegate:
        if (target_class is PublishHandler and target_kwargs is not None and not self.transforms
                and self.settings.get("log_function") is log_request):
            # the fast path answers exactly as PublishHandler would: the access log is
            # log_request and no output transform (gzip) runs
            return _FastPublish(self, request, target_kwargs)
        return super().get_handler_delegate(request, target_class, target_kwargs, path_args, path_kwargs)

    def publish_handler_delegate(self, request: httputil.HTTPServerRequest,
                                 kwargs: Dict[str, Any]) -> httputil.HTTPMessageDelegate:
        """The :class:`PublishHandler` delegate of ``request`` (what the route gives without the
        fast path)."""
        return super().get_handler_delegate(request, PublishHandler, kwargs)


_SERVER_HEADER = "TornadoServer/%s" % tornado.version  # what RequestHandler.clear() sets
#: The start line of the fast path's common answers (an immutable named tuple: built once).
_START_LINES = {status: httputil.ResponseStartLine("", status, httputil.responses[status]) for status in (200, 503)}
_date_cache: List[Any] = [0, ""]


def _http_date() -> str:
    """The ``Date`` header, formatted once per second (as RequestHandler formats it per request)."""
    now = time.time()
    second = int(now)
    if _date_cache[0] != second:
        _date_cache[0], _date_cache[1] = second, httputil.format_timestamp(now)
    return _date_cache[1]


class _FastPublish(httputil.HTTPMessageDelegate):
    """One ``POST /api/publish`` on the fast path (see :class:`ApiApplication`)."""

    __slots__ = ("app", "api", "kwargs", "request", "start_line", "headers", "chunks", "delegate", "saved",
                 "deadline")

    def __init__(self, app: ApiApplication, request: httputil.HTTPServerRequest, kwargs: Dict[str, Any]):
        self.app = app
        self.api: HttpApi = kwargs["api"]
        self.kwargs = kwargs
        self.request = request
        self.chunks: List[bytes] = []
        #: The PublishHandler delegate once the request left the fast path, else None.
        self.delegate: Optional[httputil.HTTPMessageDelegate] = None
        self.saved: Optional[tuple] = None  # what apply_forwarded changed, to undo before a replay
        #: The body's deadline (a loop timeout handle) while the body is read, else None.
        self.deadline: Any = None

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Optional[Awaitable[None]]:
        self.start_line, self.headers = start_line, headers
        request, api = self.request, self.api
        # The checks of ApiHandler.prepare that decide the answer, in its order; any refusal is
        # PublishHandler's to give (key first: 401 before anything else is looked at).
        length = headers.get("Content-Length")
        if (request.method != "POST"
                or not api.authorized(headers.get("Authorization"))
                or not _json_media(headers.get("Content-Type", ""))
                or "Transfer-Encoding" in headers or length is None
                or not (length.isascii() and length.isdigit())  # "²".isdigit(), int("²") fails
                or int(length) > min(api.max_body_size, self.app.max_fast_body)):
            return self._leave()
        trusted = api.server.settings.trusted_proxies
        if trusted:
            self.saved = (request.remote_ip, request.protocol, request.host, request.host_name,
                          headers.get("Host"))
            apply_forwarded(request, trusted)
        connection = request.connection
        if isinstance(connection, HTTP1Connection):
            connection.set_max_body_size(1 << 62)  # as ApiHandler._lift_connection_limit
            timeout = connection.params.body_timeout
            if timeout is not None:
                # The same body_timeout, as one loop timeout of this request's own instead of
                # Tornado's gen.with_timeout around the body read, which runs the read as a task
                # of its own (a task, a loop turn and a timeout per request, even when the body
                # came with the head): measured as the largest share of what a one-message publish
                # cost beyond a bare Tornado handler (bench/http_single_layers.py).
                connection.set_body_timeout(None)  # type: ignore[arg-type]  # None: no timeout
                self.deadline = IOLoop.current().call_later(timeout, _body_timed_out, connection)
        if not api.sampler.running:
            api.sampler.start()
        mark_authenticated(request)
        return None

    def _leave(self) -> Optional[Awaitable[None]]:
        self.delegate = delegate = self.app.publish_handler_delegate(self.request, self.kwargs)
        return delegate.headers_received(self.start_line, self.headers)

    def data_received(self, chunk: bytes) -> Optional[Awaitable[None]]:
        if self.delegate is not None:
            return self.delegate.data_received(chunk)
        self.chunks.append(chunk)
        return None

    def on_connection_close(self) -> None:
        self._end_deadline()
        if self.delegate is not None:
            self.delegate.on_connection_close()
        self.chunks = []

    def _end_deadline(self) -> None:
        if self.deadline is not None:
            IOLoop.current().remove_timeout(self.deadline)
            self.deadline = None

    def finish(self) -> None:
        if self.deadline is not None:
            self._end_deadline()
        if self.delegate is not None:
            self.delegate.finish()
            return
        server = self.api.server
        data = b"".join(self.chunks)
        self.chunks = []
        try:
            text = data.decode("utf-8")
            body = _DECODER.decode(text)  # exactly json.loads: ujson accepts 01, 1., NaN, raw control characters
            sender = web_socket_id_from_headers(self.headers)
            registry = server.registry
            if type(body) is list:
                if len(body) > server.publish_slice:
                    raise _Replay()  # PublishHandler works through it in slices
                # no "[i]." prefix: a refusal is answered by PublishHandler, which names the field
                envelopes = [publish_envelope(registry, item, "", sender) for item in body]
            else:
                envelopes = [publish_envelope(registry, body, "", sender)]
        except Exception:  # a refusal (or a surprise): PublishHandler answers it, from the bytes
            self._replay(data)
            return
        del body, text, data
        started = time.perf_counter()
        try:
            result = server.submit_now(envelopes)
        except Exception as exc:
            self._not_published(exc)
            return
        if isinstance(result, int):
            self._published(envelopes, result, started)
        else:
            _keep(asyncio.ensure_future(self._await(envelopes, result, started)))

    async def _await(self, envelopes: List[Envelope], result: Awaitable[int], started: float) -> None:
        try:
            delivered = await result
        except Exception as exc:
            self._not_published(exc)
            return
        self._published(envelopes, delivered, started)

    def _not_published(self, exc: Exception) -> None:
        """The answer when the publish failed (called in the ``except`` block: a 500 logs it):
        503 when the broker cannot take it, else 500."""
        if isinstance(exc, BrokerUnavailable):
            self._answer_error(503, f"the broker cannot take the publish: {exc}")
        else:
            self._internal_error()

    def _published(self, envelopes: List[Envelope], delivered: int, started: float) -> None:
        # Answered once the hub's flush has written the frames (right away when none is pending):
        # the frames leave in one burst before the answer wakes the publisher, instead of the
        # answer first and the frames while the publisher is already busy with it.
        self.api.server.hub.after_flush(self._answer_published, len(envelopes), delivered, started)

    def _answer_published(self, published: int, delivered: int, started: float) -> None:
        api = self.api
        api.fast_publishes += 1
        metrics = api.metrics
        if metrics is not None and published:
            metrics.observe_publish(started, published)
        self._answer(200, b'{"published":%d,"delivered":%d}' % (published, delivered))

    def _answer(self, status: int, body: bytes) -> None:
        """Write the answer as PublishHandler.reply() does: the same headers in the same order."""
        headers = httputil.HTTPHeaders()
        headers["Server"] = _SERVER_HEADER
        headers["Content-Type"] = "application/json; charset=UTF-8"
        headers["Date"] = _http_date()
        headers["Cache-Control"] = "no-store"
        headers["Content-Length"] = str(len(body))
        connection = self.request.connection
        assert connection is not None
        start = _START_LINES.get(status)
        if start is None:
            start = httputil.ResponseStartLine("", status, httputil.responses.get(status, "Unknown"))
        connection.write_headers(start, headers, body)
        connection.finish()
        _log_access(status, self.request)

    def _answer_error(self, status: int, message: str) -> None:
        self._answer(status, _encode({"error": message, "field": None}).encode("utf-8"))

    def _internal_error(self) -> None:
        request = self.request
        log.error("uncaught exception in %s", transport.request_summary(request), exc_info=True)
        self._answer_error(500, "internal server error")

    def _replay(self, body: bytes) -> None:
        """Hand the request, head and body, to PublishHandler (which answers it)."""
        if self.saved is not None:  # PublishHandler applies the forwarded headers itself
            request = self.request
            request.remote_ip, request.protocol, request.host, request.host_name, host = self.saved
            if host is not None:
                self.headers["Host"] = host
        delegate = self.app.publish_handler_delegate(self.request, self.kwargs)

        async def replay() -> None:
            waiting = delegate.headers_received(self.start_line, self.headers)
            if waiting is not None:
                await waiting
            if body:
                waiting = delegate.data_received(body)
                if waiting is not None:
                    await waiting
            delegate.finish()
        task = _keep(asyncio.ensure_future(replay()))
        task.add_done_callback(_log_replay_failure)


def _body_timed_out(connection: HTTP1Connection) -> None:
    """What Tornado does when a body is not read within ``body_timeout`` (the same log line):
    close the connection (the delegate is told through ``on_connection_close``)."""
    gen_log.info("Timeout reading body from %s", connection.context)
    if connection.stream is not None:
        connection.stream.close()


#: The fast path's tasks while they run (the loop holds only weak references to tasks).
_TASKS: "set[asyncio.Future[None]]" = set()


def _keep(task: "asyncio.Future[None]") -> "asyncio.Future[None]":
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
    return task


class _Replay(Exception):
    """Leave the fast path (not an error of the request)."""


def _log_replay_failure(future: "asyncio.Future[None]") -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("publish replay failed", exc_info=future.exception())


def _json_media(content_type: str) -> bool:
    """ApiHandler.prepare's test of the ``Content-Type`` header."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class DisconnectHandler(ApiHandler):
    """``POST /api/disconnect``: force_disconnect (4003) for every connection of the users, except
    ``ignore_web_socket_ids`` (default: the request's ``WebSocketId`` header, if any)."""

    json_methods = ("post",)

    async def post(self) -> None:
        body = self.json_object(("user_ids", "ignore_web_socket_ids"), required=("user_ids",))
        users = require_ids(body["user_ids"], "user_ids")
        if "ignore_web_socket_ids" in body:
            spared = body["ignore_web_socket_ids"]
            if spared is None:
                spared = []
            if not isinstance(spared, list) or not all(isinstance(w, str) for w in spared):
                raise ApiError(400, "ignore_web_socket_ids must be a list of strings", "ignore_web_socket_ids")
        else:
            sender = web_socket_id_from_request(self)
            spared = [sender] if sender else []
        try:
            disconnected = await self.server.disconnect_async(users, spared)
        except BrokerUnavailable as exc:
            raise ApiError(503, f"the broker cannot take the disconnect: {exc}") from None
        self.reply({"disconnected": disconnected})


class RevokeHandler(ApiHandler):
    """``POST /api/revoke``: drop the users' pages in a permission group, with page_discard."""

    json_methods = ("post",)

    async def post(self) -> None:
        body = self.json_object(("user_ids", "permission_group"), required=("user_ids", "permission_group"))
        users = require_ids(body["user_ids"], "user_ids")
        try:
            discarded = await self.server.revoke_async(users, body["permission_group"])
        except BrokerUnavailable as exc:
            raise ApiError(503, f"the broker cannot take the revoke: {exc}") from None
        self.reply({"discarded": discarded})


def _directory_counts(directory: Directory) -> Dict[str, int]:
    snapshot = directory.snapshot()
    return {name: len(snapshot[name]) for name in ("workspaces", "tables", "public_views")}


class _DirectoryChange(ApiHandler):
    async def change(self, operation: str, *args: Any) -> None:
        self.directory()  # 404 without the in-memory directory
        try:
            await self.server.change_directory(operation, *args)
        except BrokerUnavailable as exc:
            raise ApiError(503, f"the broker cannot take the directory change: {exc}") from None

    async def changed(self, operation: str, *args: Any) -> None:
        await self.change(operation, *args)
        self.reply({"ok": True})


class DirectoryHandler(_DirectoryChange):
    """``PUT /api/directory`` replaces the directory (validated first; on error nothing changes);
    ``GET /api/directory`` returns its snapshot.

    Every change (here and in the incremental endpoints below) travels through the broker as a
    ``directory`` envelope (``RealtimeServer.change_directory``): with the Redis broker it changes
    the directory of every process, in the order of the events; the answer comes once this process
    applied it (503 when the broker cannot take it)."""

    json_methods = ("put",)

    def get(self) -> None:
        self.reply(self.directory().snapshot())

    async def put(self) -> None:
        directory = self.directory()
        await self.change("load", self.json_body())
        self.reply(_directory_counts(directory))


class DirectoryWorkspaceHandler(_DirectoryChange):
    """``PUT /api/directory/workspaces/{workspace_id}`` ``{"members": [...]}`` creates or
    replaces one workspace; ``DELETE`` forgets it with its tables and public views."""

    json_methods = ("put",)

    async def put(self, workspace_id: str) -> None:
        body = self.json_object(("members",), required=("members",))
        members = require_ids(body["members"], "members")
        await self.changed("set_workspace", workspace_id, members)

    async def delete(self, workspace_id: str) -> None:
        await self.changed("remove_workspace", workspace_id)


class DirectoryMemberHandler(_DirectoryChange):
    """``PUT``/``DELETE /api/directory/workspaces/{workspace_id}/members/{user_id}``: add or
    remove one member (no body)."""

    async def put(self, workspace_id: str, user_id: str) -> None:
        await self.changed("add_member", workspace_id, user_id)

    async def delete(self, workspace_id: str, user_id: str) -> None:
        await self.changed("remove_member", workspace_id, user_id)


class DirectoryTableHandler(_DirectoryChange):
    """``PUT /api/directory/tables/{table_id}`` ``{"workspace_id": ID}``; ``DELETE`` forgets it."""

    json_methods = ("put",)

    async def put(self, table_id: str) -> None:
        body = self.json_object(("workspace_id",), required=("workspace_id",))
        workspace_id = require_id(body["workspace_id"], "workspace_id", text="workspace_id must be an id")
        await self.changed("set_table", table_id, workspace_id)

    async def delete(self, table_id: str) -> None:
        await self.changed("remove_table", table_id)


class DirectoryPublicViewHandler(_DirectoryChange):
    """``PUT /api/directory/public_views/{slug}`` ``{"table_id": ID, "token": null}``; ``DELETE``."""

    json_methods = ("put",)

    async def put(self, slug: str) -> None:
        body = self.json_object(("table_id", "token"))
        await self.changed("set_public_view", slug, body.get("table_id"), body.get("token"))

    async def delete(self, slug: str) -> None:
        await self.changed("remove_public_view", slug)


class StatsHandler(ApiHandler):
    """``GET /api/stats``."""

    def get(self) -> None:
        self.reply(self.server.stats())


class LiveStatsHandler(ApiHandler):
    """``GET /api/stats/live``: what the admin page shows (:func:`tornado_rt.admin.live_stats`)."""

    def get(self) -> None:
        self.reply(live_stats(self.server, self.api.sampler, self.api.started, broker_health(self.server)))


class AdminHandler(ApiHandler):
    """``GET /admin`` (no key): the live admin page, static HTML that asks for an API key and
    reads ``/api/stats/live`` with it (:data:`tornado_rt.admin.ADMIN_PAGE`)."""

    requires_key = False

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Content-Security-Policy",
                        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                        "connect-src 'self'; frame-ancestors 'none'")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.finish(ADMIN_PAGE)


class TypesHandler(ApiHandler):
    """``GET /api/types`` (no key): the message catalogue of this server's registry
    (:func:`tornado_rt.catalogue.catalogue`, the same as ``tornado-rt types --json``)."""

    requires_key = False

    def get(self) -> None:
        from .catalogue import catalogue
        self.reply(catalogue(self.server.registry))


class OpenApiHandler(ApiHandler):
    """``GET /api/openapi.json`` (no key): the OpenAPI 3 document of this application. The
    operations it describes still need the key."""

    requires_key = False

    def initialize(self, api: HttpApi, document: Dict[str, Any]) -> None:  # type: ignore[override]
        super().initialize(api)
        self.document = document

    def get(self) -> None:
        self.reply(self.document)


class DocsHandler(ApiHandler):
    """``GET /api/docs`` (no key): a self-contained HTML page (no CDN, no external script) that
    fetches ``/api/openapi.json`` and lists its operations and schemas."""

    requires_key = False

    def get(self) -> None:
        from .openapi import DOCS_PAGE
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Content-Security-Policy",
                        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                        "connect-src 'self'")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.finish(DOCS_PAGE)


def broker_health(server: RealtimeServer) -> Dict[str, Any]:
    """``{"kind", "connected"}`` of the server's broker: ``in-process`` is always connected; a
    broker with a ``connected`` attribute (Redis) reports it."""
    broker = server.broker
    kind = getattr(broker, "kind", None)
    if not isinstance(kind, str):
        name = type(broker).__name__
        kind = {"LocalBroker": "in-process", "RedisBroker": "redis"}.get(name, name)
    connected = getattr(broker, "connected", True)
    return {"kind": kind, "connected": bool(connected)}


class HealthHandler(ApiHandler):
    """``GET /healthz`` (no key): ``{"status": "ok" | "degraded", "broker": {"kind",
    "connected"}}`` plus ``"directory": {"saved", "save_failures"}`` when the directory is kept in
    a file; 503 with status ``degraded`` while the broker is unreachable, so that a load balancer
    drains the process (its WebSocket clients stay connected; publishes get 503 meanwhile)."""

    requires_key = False

    def get(self) -> None:
        broker = broker_health(self.server)
        body: Dict[str, Any] = {"status": "ok" if broker["connected"] else "degraded", "broker": broker}
        directory = self.server.directory
        if directory is not None and directory.store is not None:
            body["directory"] = {"saved": directory.last_save_error is None,
                                 "save_failures": directory.save_failures}
        self.reply(body, 200 if broker["connected"] else 503)


class MetricsHandler(ApiHandler):
    """``GET /metrics`` (no key): Prometheus text exposition."""

    requires_key = False

    def get(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST

        metrics = self.api.metrics
        if metrics is None:  # the route exists only with metrics; an embedder may mount it anyway
            raise ApiError(404, "metrics are off on this server")
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(metrics.exposition())


class ClientScriptHandler(ApiHandler):
    """``GET /client/tornado-rt.js`` (no key): the browser / Node client, an ES module. Any origin
    may load it (module scripts are fetched with CORS); browsers revalidate it with the ETag."""

    requires_key = False
    PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "tornado-rt.js")

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-cache")

    def get(self) -> None:
        with open(self.PATH, "rb") as fh:
            script = fh.read()
        self.set_header("Content-Type", "text/javascript; charset=utf-8")
        self.set_header("Access-Control-Allow-Origin", "*")
        self.finish(script)


class NotFoundHandler(ApiHandler):
    """Every path no route matches: 404 in the JSON error form."""

    requires_key = False

    def prepare(self) -> None:
        apply_forwarded(self.request, self.api.server.settings.trusted_proxies)
        self._lift_connection_limit()
        raise ApiError(404, f"no such endpoint: {self.request.path}")


# --- assembly -----------------------------------------------------------------------------------------

#: The HTTP routes: (OpenAPI path template, Tornado pattern, handler). The WebSocket route comes
#: from ``server.routes()``; ``/metrics`` is added when metrics are on.
API_ROUTES = [
    ("/api/publish", r"/api/publish", PublishHandler),
    ("/api/disconnect", r"/api/disconnect", DisconnectHandler),
    ("/api/revoke", r"/api/revoke", RevokeHandler),
    ("/api/directory", r"/api/directory", DirectoryHandler),
    ("/api/directory/workspaces/{workspace_id}", r"/api/directory/workspaces/([^/]+)",
     DirectoryWorkspaceHandler),
    ("/api/directory/workspaces/{workspace_id}/members/{user_id}",
     r"/api/directory/workspaces/([^/]+)/members/([^/]+)", DirectoryMemberHandler),
    ("/api/directory/tables/{table_id}", r"/api/directory/tables/([^/]+)", DirectoryTableHandler),
    ("/api/directory/public_views/{slug}", r"/api/directory/public_views/([^/]+)",
     DirectoryPublicViewHandler),
    ("/api/stats", r"/api/stats", StatsHandler),
    ("/api/stats/live", r"/api/stats/live", LiveStatsHandler),
    ("/api/types", r"/api/types", TypesHandler),
    ("/api/openapi.json", r"/api/openapi\.json", OpenApiHandler),
    ("/api/docs", r"/api/docs", DocsHandler),
    ("/healthz", r"/healthz", HealthHandler),
    ("/client/tornado-rt.js", r"/client/tornado-rt\.js", ClientScriptHandler),
    ("/admin", r"/admin", AdminHandler),
]
METRICS_ROUTE = ("/metrics", r"/metrics", MetricsHandler)


def make_app(server: RealtimeServer, api_keys: Sequence[str], *, metrics: bool = True,
             max_body_size: int = DEFAULT_MAX_BODY_SIZE, **app_settings: Any) -> Application:
    """The standalone server's Tornado application: the WebSocket endpoint of ``server`` plus the
    HTTP server API.

    ``api_keys``: the keys accepted as ``Authorization: Bearer <key>`` (at least one).
    ``metrics``: serve ``GET /metrics``. ``max_body_size``: request body limit in bytes (413
    above it). Other keyword arguments are Tornado application settings. The application's
    ``http_api`` attribute is the :class:`HttpApi` (its ``metrics.registry`` is the Prometheus
    registry) and ``openapi`` is the OpenAPI document.
    """
    api = HttpApi(server, api_keys, max_body_size, Metrics(server) if metrics else None)
    routes = list(API_ROUTES) + ([METRICS_ROUTE] if metrics else [])
    from .openapi import openapi_document
    ws_path = server.settings.path_prefix
    document = openapi_document([template for template, _, _ in routes], ws_path, max_body_size,
                                registry=server.registry)
    handlers: list = []
    for _, pattern, handler in routes:
        kwargs: Dict[str, Any] = {"api": api}
        if handler is OpenApiHandler:
            kwargs["document"] = document
        handlers.append((pattern, handler, kwargs))
    app_settings.setdefault("log_function", log_request)
    app_settings.setdefault("default_handler_class", NotFoundHandler)
    app_settings.setdefault("default_handler_args", {"api": api})
    app = server.make_app(handlers, application_class=ApiApplication, **app_settings)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass  # started by the first request instead
    else:
        api.sampler.start()
    app.http_api = api  # type: ignore[attr-defined]
    app.openapi = document  # type: ignore[attr-defined]
    return app
