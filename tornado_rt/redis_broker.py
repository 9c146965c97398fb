"""A broker over Redis pub/sub, so that several tornado-rt processes (and machines) act as one.

Install the extra: ``pip install tornado-rt[redis]`` (``redis`` with ``hiredis``). Then::

    from tornado_rt.redis_broker import RedisBroker
    server = RealtimeServer(settings, broker=RedisBroker("redis://127.0.0.1:6379/0"))
    await server.start()          # connects and subscribes before the first publish

or ``tornado-rt serve --broker redis://127.0.0.1:6379/0`` (``TORNADO_RT_BROKER``).

Channel layout
    **One channel per namespace** (``<channel_prefix>:envelopes``) carries every envelope. Each
    publish is serialized once and crosses Redis once (one ``PUBLISH``), whatever the number of
    recipients; every process subscribes and its router resolves the audience against its own
    connections. The alternative — a channel per page group with local subscribers — would save
    a process the parsing of envelopes it has no recipient for, but it splits the stream into
    channels with no common order, and workspace/user audiences (resolved from membership at
    delivery) need every process anyway. See the README for the measurements.

Order and consistency
    Redis executes ``PUBLISH`` commands one at a time and writes each channel message to every
    subscriber in that order, so every process sees the same envelopes in the same total order.
    Publishes of one process leave in call order through a single connection (pipelined in
    batches, one batch in flight), so per-publisher order holds. A process does **not** deliver
    its own envelopes locally first: it waits for them to come back through Redis like everyone
    else's, so that membership side effects (``group_user_added``, ``group_user_deleted``, ...)
    are applied at the same place in the order on every process and every process resolves
    workspace audiences against the same directory state.

Wire format
    One Redis message per envelope: a JSON header line (``Envelope.to_wire()`` without the
    message text, plus ``o``, the origin broker's id, and ``n``, its sequence number), a newline,
    then the message text (``Envelope.data``) as published. The message text is never escaped into
    another JSON string (that costs 4-5x more for large messages). ujson never writes a raw newline,
    so the first newline ends the header.

Publishing
    :meth:`RedisBroker.publish` returns an ``asyncio.Future`` that completes once the envelope has
    come back through this process's subscription and been handed to the router — so
    ``server.submit()`` / ``publish_async()`` / ``POST /api/publish`` return after local delivery,
    exactly as with the in-process broker. It raises :class:`~tornado_rt.BrokerUnavailable` at once
    when the subscription is down, and the future fails with it when Redis refuses or drops the
    command, when the subscription breaks before the envelope came back, or after
    ``delivery_timeout`` seconds.

Connections
    Two connections of redis-py's asyncio client (``redis.asyncio.connection``; hiredis parses
    replies when installed): one subscribed, one for publishing. Not the pooled ``Redis`` client:
    concurrent publishes could leave on different pooled connections and overtake each other,
    and one owned connection lets the broker pipeline a batch of ``PUBLISH`` commands in one write.

Failure
    WebSocket clients are never touched by a Redis outage. Socket timeouts are short and there are
    no command retries, so publishing fails fast. The subscriber reconnects with capped exponential
    backoff (``reconnect_min`` .. ``reconnect_max`` seconds) and resubscribes; delivery resumes
    without a restart. While it is connected it sends ``PING`` after ``health_check_interval``
    seconds of silence and reconnects when no reply comes within another interval.

What is lost during an outage (Redis pub/sub is at-most-once)
    * Envelopes published by *other* processes while this process's subscription is down never
      reach this process's connections, and their side effects (directory updates, revocations)
      are not applied here: after an outage, refresh the directory (``PUT /api/directory`` on every
      process, or ``Directory.load``) if directory events may have been published meanwhile.
    * Publishes attempted while Redis (or this process's subscription) is down fail with
      ``BrokerUnavailable`` (HTTP 503); nothing the broker accepted is dropped silently by the
      publisher. A failure reported *while* Redis goes away is ambiguous: the envelope may have
      reached processes whose subscriptions were still up (retrying may deliver it twice).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import uuid
from typing import Any, Deque, Dict, List, Optional, Tuple

import ujson

from .broker import Broker, BrokerUnavailable
from .envelope import Envelope
from .redaction import redact_url

try:
    from redis.asyncio.connection import ConnectionPool
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("RedisBroker needs the redis extra: pip install 'tornado-rt[redis]'") from exc

log = logging.getLogger("tornado_rt.redis")

#: Envelopes sent in one pipelined write to Redis at most.
MAX_BATCH = 512


class RedisBroker(Broker):
    """Event bus over one Redis pub/sub channel shared by every process (see the module docstring).

    ``url``: ``redis://[[user]:[password]@]host[:port][/db]``, ``rediss://…`` (TLS) or
    ``unix:///path.sock`` — anything redis-py's ``ConnectionPool.from_url`` takes.
    ``channel_prefix``: processes with the same prefix on the same Redis form one server
    (default ``"tornado-rt"``; the channel is ``"<prefix>:envelopes"``).
    ``connect_timeout``: seconds for the TCP connect (default 1.0); ``socket_timeout``: seconds
    for the rest of a Redis exchange — the connection handshake, the reply to ``SUBSCRIBE``, one
    pipelined batch of ``PUBLISH`` commands and their replies (default 2.0). A publish never waits
    longer than that for Redis: it fails with ``BrokerUnavailable``.
    ``reconnect_min`` / ``reconnect_max``: backoff of the subscriber between attempts (0.1 → 5 s).
    ``health_check_interval``: seconds of silence on the subscription before a ``PING`` (default 5).
    ``delivery_timeout``: seconds a publish waits for its envelope to come back (default 10;
    checked every ``health_check_interval``).
    ``start_timeout``: how long :meth:`start` keeps trying to subscribe before it raises
    ``BrokerUnavailable`` (default 5).
    """

    def __init__(self, url: str, channel_prefix: str = "tornado-rt", *,
                 socket_timeout: float = 2.0, connect_timeout: float = 1.0,
                 reconnect_min: float = 0.1, reconnect_max: float = 5.0,
                 health_check_interval: float = 5.0, delivery_timeout: float = 10.0,
                 start_timeout: float = 5.0):
        if not channel_prefix or not isinstance(channel_prefix, str):
            raise ValueError("channel_prefix must be a non-empty string")
        self.url = url
        self.channel = f"{channel_prefix}:envelopes"
        # protocol=2: subscription replies are plain arrays. No command retries: fail fast.
        # socket_timeout=None: redis-py would arm a timer for every reply read; the broker bounds
        # a whole batch of publishes instead, and watches the subscription with PING.
        self._pool = ConnectionPool.from_url(
            url, socket_connect_timeout=connect_timeout, socket_keepalive=True, retry=None,
            client_name="tornado-rt")
        kwargs = self._pool.connection_kwargs
        kwargs["protocol"] = 2
        kwargs["socket_timeout"] = None
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self._publish_prefix = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (
            len(self.channel.encode()), self.channel.encode())
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.health_check_interval = health_check_interval
        self.delivery_timeout = delivery_timeout
        self.start_timeout = start_timeout
        self.origin = uuid.uuid4().hex[:16]
        self._seq = itertools.count(1)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        # seq -> (future, deadline, envelope); insertion order is publish order.
        self._pending: Dict[int, Tuple[asyncio.Future, float, Envelope]] = {}
        self._outbox: Deque[Tuple[int, bytes]] = collections.deque()
        self._wake = asyncio.Event()  # (an Event binds to the running loop on first use)
        self._subscribed = False
        self._ready = asyncio.Event()
        self._closed = False
        self._tasks: List[asyncio.Task] = []
        self._sub_conn = None
        self._pub_conn = None
        self._last_error: Optional[str] = None
        self._last_read = 0.0
        #: Subscriptions made (1 + reconnects): tells a reconnect from the first subscription.
        self.subscriptions = 0

    # --- state ----------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether this process is subscribed right now (publishing is possible)."""
        return self._subscribed

    def _unavailable(self, why: str) -> BrokerUnavailable:
        return BrokerUnavailable(f"Redis broker unavailable ({redact_url(self.url)}): {why}")

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, subscribe, and start the publisher. Raises ``BrokerUnavailable`` when Redis
        cannot be reached within ``start_timeout`` seconds (nothing is left running then)."""
        if self._tasks:
            return
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._tasks = [self._loop.create_task(self._subscribe_forever()),
                       self._loop.create_task(self._write_forever())]
        try:
            async with asyncio.timeout(self.start_timeout):
                await self._ready.wait()
        except TimeoutError:
            await self.close()
            raise self._unavailable(f"not reachable within {self.start_timeout:g} s "
                                    f"({self._last_error or 'no reply'})") from None

    async def close(self) -> None:
        """Stop the subscriber and the publisher; pending publishes fail with BrokerUnavailable."""
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # gather: the tasks' own CancelledError is collected, a cancellation of close() is not.
        await asyncio.gather(*tasks, return_exceptions=True)
        self._subscribed = False
        self._fail_pending(self._unavailable("broker closed"))
        self._outbox.clear()
        for conn in (self._sub_conn, self._pub_conn):
            if conn is not None:
                await _disconnect(conn)
        self._sub_conn = self._pub_conn = None
        await self._pool.disconnect()

    # --- publishing -----------------------------------------------------------------------------
    def publish(self, envelope: Envelope) -> "asyncio.Future[None]":
        """Queue ``envelope`` for Redis; see the module docstring for what the future means."""
        if not self._subscribed:
            if self._closed:
                raise self._unavailable("broker closed")
            if not self._tasks:
                raise self._unavailable("broker not started")
            raise self._unavailable(f"not connected ({self._last_error or 'reconnecting'})")
        seq = next(self._seq)
        wire = envelope.to_wire()
        data = wire.pop("d", None)
        wire["o"] = self.origin
        wire["n"] = seq
        payload = ujson.dumps(wire, ensure_ascii=False).encode()
        if data is not None:
            payload += b"\n" + data.encode()
        # The envelope is delivered here when it comes back, without decoding it again.
        loop = self._loop
        assert loop is not None  # start() sets it before the subscription can exist
        future = loop.create_future()
        self._pending[seq] = (future, loop.time() + self.delivery_timeout, envelope)
        self._outbox.append((seq, payload))
        self._wake.set()
        return future

    async def _write_forever(self) -> None:
        """The one writer: sends queued PUBLISH commands in call order, a batch at a time."""
        wake, outbox, pending = self._wake, self._outbox, self._pending
        while True:
            await wake.wait()
            wake.clear()
            while outbox:
                batch: List[Tuple[int, bytes]] = []
                while outbox and len(batch) < MAX_BATCH:
                    seq, payload = outbox.popleft()
                    entry = pending.get(seq)
                    if entry is not None and not entry[0].done():
                        batch.append((seq, payload))
                if not batch:
                    continue
                try:
                    conn = self._pub_conn
                    if conn is None:
                        conn = await self._connect()
                        self._pub_conn = conn
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
                    # cancellation of close() when the inner call finishes at the same moment.
                    async with asyncio.timeout(self.socket_timeout):
                        await self._send(conn, batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the writer must survive anything: Redis, OS, timeouts
                    if isinstance(exc, TimeoutError):
                        exc = TimeoutError(f"no reply from Redis within {self.socket_timeout:g} s")
                    self._last_error = _describe(exc)
                    log.warning("publish to Redis failed: %s", self._last_error,
                                exc_info=not isinstance(exc, (RedisError, OSError)))
                    conn, self._pub_conn = self._pub_conn, None
                    if conn is not None:
                        await _disconnect(conn)
                    error = self._unavailable(f"publish failed ({self._last_error})")
                    for seq, _ in batch:
                        self._fail(seq, error)

    async def _connect(self) -> Any:
        conn = self._pool.make_connection()
        try:
            async with asyncio.timeout(self.connect_timeout + self.socket_timeout):
                await conn.connect()  # TCP connect, then the handshake (CLIENT SETNAME, AUTH, SELECT)
        except BaseException:
            await _disconnect(conn)
            raise
        return conn

    async def _send(self, conn: Any, batch: List[Tuple[int, bytes]]) -> None:
        """One pipelined write of PUBLISH commands, then their replies (subscriber counts)."""
        prefix = self._publish_prefix
        parts = []
        for _, payload in batch:
            parts.append(prefix)
            parts.append(b"$%d\r\n" % len(payload))
            parts.append(payload)
            parts.append(b"\r\n")
        await conn.send_packed_command([b"".join(parts)], check_health=False)
        for _ in batch:
            await conn.read_response()

    # --- subscription ---------------------------------------------------------------------------
    async def _subscribe_forever(self) -> None:
        delay = self.reconnect_min
        interval = self.health_check_interval
        while not self._closed:
            conn = self._pool.make_connection()
            self._sub_conn = conn
            try:
                async with asyncio.timeout(self.connect_timeout + self.socket_timeout):
                    await conn.connect()  # TCP connect, then the handshake (CLIENT SETNAME, AUTH, SELECT)
                await conn.send_command("SUBSCRIBE", self.channel, check_health=False)
                async with asyncio.timeout(self.socket_timeout):
                    reply = await conn.read_response()
                if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
                    raise _protocol_error(f"unexpected reply to SUBSCRIBE: {reply!r}")
                self._subscribed = True
                self.subscriptions += 1
                self._last_error = None
                if self.subscriptions > 1:
                    log.warning("resubscribed to Redis channel %s: envelopes published by other "
                                "processes during the outage were not received here", self.channel)
                else:
                    log.info("subscribed to Redis channel %s at %s", self.channel, redact_url(self.url))
                self._ready.set()
                delay = self.reconnect_min
                await self._read(conn, interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the subscriber must survive anything: Redis, OS, timeouts
                if isinstance(exc, TimeoutError):
                    exc = TimeoutError(f"no reply from Redis within {self.socket_timeout:g} s")
                self._last_error = _describe(exc)
                if not isinstance(exc, (RedisError, OSError)):
                    log.error("unexpected error on the Redis subscription", exc_info=exc)
                if self._subscribed:
                    log.warning("Redis subscription lost: %s; reconnecting", self._last_error)
                else:
                    # Before the first subscription start() reports the failure itself.
                    log.log(logging.WARNING if self.subscriptions else logging.DEBUG,
                            "cannot subscribe to Redis at %s: %s; retrying in %.1f s",
                            redact_url(self.url), self._last_error, delay)
            finally:
                was_subscribed, self._subscribed = self._subscribed, False
                if was_subscribed:
                    self._fail_pending(self._unavailable(
                        f"subscription lost before the envelope came back ({self._last_error})"))
                self._sub_conn = None
                await _disconnect(conn)
            if self._closed:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max)

    async def _read(self, conn: Any, interval: float) -> None:
        """Deliver every channel message until the connection breaks (raises). A watchdog task
        sends PING after ``interval`` seconds of silence and breaks the connection when the
        following interval brings nothing either."""
        loop = asyncio.get_running_loop()
        self._last_read = loop.time()
        watchdog = loop.create_task(self._watch(conn, interval))
        try:
            channel_message = b"message"
            on_message = self._on_message
            read = conn.read_response
            while True:
                reply = await read()
                self._last_read = loop.time()
                if reply[0] == channel_message:
                    on_message(reply[2])
        finally:
            watchdog.cancel()

    async def _watch(self, conn: Any, interval: float) -> None:
        loop = asyncio.get_running_loop()
        pinged_at: Optional[float] = None
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            self._expire(now)
            if pinged_at is not None and self._last_read < pinged_at:
                self._last_error = f"no reply to PING within {interval:g} s"
                log.warning("Redis subscription silent: %s; reconnecting", self._last_error)
                await _disconnect(conn)  # the reader's pending read fails, and it reconnects
                return
            pinged_at = None
            if now - self._last_read >= interval:
                pinged_at = now
                try:
                    await conn.send_command("PING", check_health=False)
                except Exception:  # the connection is broken: the reader sees it too
                    await _disconnect(conn)
                    return

    def _on_message(self, payload: bytes) -> None:
        entry = None
        try:
            cut = payload.find(b"\n")
            wire = ujson.loads(payload if cut < 0 else payload[:cut])
            if wire.get("o") == self.origin:
                entry = self._pending.pop(wire.get("n"), None)
            if entry is not None:
                envelope = entry[2]  # our own: the original, no need to decode it
            else:
                if cut >= 0:
                    wire["d"] = payload[cut + 1:].decode()
                envelope = Envelope.from_wire(wire)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            log.error("ignored a malformed envelope on Redis channel %s", self.channel)
            return
        deliver = self._deliver
        if deliver is not None:
            try:
                deliver(envelope)
            except Exception:
                log.exception("delivery of %r failed", envelope)
        if entry is not None and not entry[0].done():
            entry[0].set_result(None)

    # --- pending publishes ----------------------------------------------------------------------
    def _fail(self, seq: int, error: BaseException) -> None:
        entry = self._pending.pop(seq, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(error)

    def _fail_pending(self, error: BaseException) -> None:
        for seq in list(self._pending):
            self._fail(seq, error)

    def _expire(self, now: float) -> None:
        """Fail publishes whose envelope has not come back within ``delivery_timeout``."""
        expired = []
        for seq, (_, deadline, _) in self._pending.items():
            if deadline > now:
                break
            expired.append(seq)
        if expired:
            error = self._unavailable(f"envelope did not come back within {self.delivery_timeout:g} s")
            for seq in expired:
                self._fail(seq, error)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _protocol_error(text: str) -> Exception:
    from redis.exceptions import ConnectionError as RedisConnectionError
    return RedisConnectionError(text)


async def _disconnect(conn: Any) -> None:
    try:
        await conn.disconnect(nowait=True)
    except Exception:  # already closed, or the loop is going away
        pass
