"""A broker over one Redis Stream, so that several tornado-rt processes (and machines) act as one.

Install the extra: ``pip install tornado-rt[redis]`` (``redis`` with ``hiredis``). Then::

    from tornado_rt.redis_broker import RedisBroker
    server = RealtimeServer(settings, broker=RedisBroker("redis://127.0.0.1:6379/0"))
    await server.start()          # connects and finds its read position before the first publish

or ``tornado-rt serve --broker redis://127.0.0.1:6379/0`` (``TORNADO_RT_BROKER``).
``docs/redis.md`` explains the design, the guarantees and the measurements; in short:

Stream layout
    **One stream per namespace** (``<channel_prefix>:stream``) carries every envelope, in one
    total order. Entries have the ids ``<n>-0`` where ``n`` grows by exactly one per envelope, so a
    reader knows when it missed some. Publishing goes through one Lua script per batch (``EVALSHA``):
    it reads Redis's clock once, appends each envelope whose deadline has not passed with ``XADD``
    (fields ``t``: Redis time in ms, ``e``: the envelope; the first entry of a new stream also has
    ``r``: the highest sequence number of the old stream its publisher knew of), then trims the
    stream once with ``XTRIM MAXLEN ~ stream_length``.

Reading
    Every process reads the whole stream from its own position (``XREAD COUNT .. BLOCK ..``), one
    reply at a time, so a process that stalls (a long GC, SIGSTOP, a slow loop) resumes exactly
    where it stopped, however much was published meanwhile: nothing is pushed at it, and Redis's
    output-buffer limits (which dropped the old pub/sub subscription) no longer apply. A lost
    connection also resumes where it stopped.

Gaps
    When the next entry is not ``position + 1`` the envelopes in between were trimmed before this
    process read them (it was more than ``stream_length`` entries behind): a **gap**. When the
    stream starts over (Redis restarted without persistence, ``FLUSHALL``, the key deleted) and
    this process had not read everything before (its position is below ``r``, or its last read
    did not reach the end of the stream), that is a gap too. A gap is
    counted (``gaps``, ``lost``), logged once with its numbers, and told to this process's clients:
    ``on_gap()`` sends ``page_discard`` for every page subscription, so they resubscribe and
    refetch. A stream that starts over after this process had read all of it is only counted
    (``resets``) and logged.

Publishing
    :meth:`RedisBroker.publish` returns an ``asyncio.Future``. Each publish has a deadline,
    ``publish_timeout`` seconds (default 2) after the call, also expressed in Redis's clock
    (a lower bound of the offset between the clocks, measured on every reply): the script refuses
    an envelope whose deadline has passed when Redis runs it. The future completes once the
    envelope came back through this process's read and was handed to the router (``submit()``,
    ``publish_async()`` and ``POST /api/publish`` return after local delivery, as with the
    in-process broker) — or, if Redis accepted it but this process has not read it back by the
    deadline, at the deadline (it is in the stream: delivery follows). It fails with
    :class:`~tornado_rt.BrokerUnavailable` at once when this process's reader is not connected,
    when Redis refuses the command, and at the deadline when Redis has not answered (then it is
    never applied later: the script would refuse it). A publish therefore never waits longer than
    ``publish_timeout``.

Idempotency
    An envelope ``id`` is delivered at most once per process within the dedup window; the window is
    measured in the stream's own clock (field ``t``), so every process drops the same duplicates.

The shared directory
    With ``share_directory=True`` (``tornado-rt serve`` sets it) and the in-memory
    :class:`~tornado_rt.Directory`, the hash ``<channel_prefix>:directory`` holds the cluster's
    latest directory snapshot (``s``) and the stream position it corresponds to (``p``). Directory
    changes are envelopes on the stream (``RealtimeServer.change_directory``), applied by every
    router in order; every process writes the snapshot after a change (a script keeps the one with
    the highest position: all processes hold the same snapshot at the same position). At start the
    snapshot is loaded and the stream read from ``p`` before :meth:`RedisBroker.start` returns;
    after a gap a newer snapshot is loaded; when Redis lost it, the running processes write theirs.

Publishing from elsewhere
    :class:`RedisPublisher` is a write-only, synchronous publisher (redis-py's sync client) for
    processes that are not servers: same registry, same envelope format, same script.

Connections
    Two connections of redis-py's asyncio client (hiredis parses replies when installed): one
    reading, one publishing (one batch in flight, in call order). Not the pooled ``Redis``
    client: concurrent publishes could leave on different pooled connections and overtake each
    other. A reader that gets no reply within two ``health_check_interval`` (the ``BLOCK`` time
    plus as long again) replaces its connection; the reconnect backoff is ``reconnect_min`` ..
    ``reconnect_max`` seconds. WebSocket clients are never touched by a Redis outage.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import logging
import uuid
from typing import Any, Deque, Dict, List, Mapping, Optional, Tuple

import ujson

from .broker import Broker, BrokerUnavailable
from .envelope import (DISCONNECT, MESSAGE, REVOKE, Envelope, PublishError, directory_envelope, id_list,
                       individual_envelope, message_envelope)
from .redaction import redact_url
from .settings import default

try:
    from redis.asyncio.connection import ConnectionPool
    from redis.exceptions import RedisError, ResponseError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("RedisBroker needs the redis extra: pip install 'tornado-rt[redis]'") from exc

log = logging.getLogger("tornado_rt.redis")

# The defaults of the constructors below: those of the settings (tornado_rt.settings declares them).
_PREFIX: str = default("redis_channel_prefix")
_STREAM_LENGTH: int = default("redis_stream_length")
_HISTORY_SIZE: int = default("history_size")
_HISTORY_TTL: float = default("history_ttl")

#: Envelopes sent in one script call to Redis at most.
MAX_BATCH = 512
#: Entries asked for by one XREAD at most, and the reply size the reader aims at (it asks for as
#: many entries as fit, at the average size of the last reply's): a process catching up after a
#: stall hands its connections about this much per loop turn, not everything at once.
READ_COUNT = 1000
READ_BYTES = 1024 * 1024
#: Safety margin (ms) taken off every deadline handed to Redis.
DEADLINE_MARGIN_MS = 5
#: A loop that did not run for this long (seconds) was stalled (GC, SIGSTOP, swapping, a long
#: loop turn): what the reader learnt just before may be stale (see ``_caught_up``).
STALL = 1.0

# KEYS[1]: the stream. ARGV[1]: MAXLEN (approximate); ARGV[2]: the highest sequence number the
# publisher knows of; ARGV[3]: history size (0: no history); ARGV[4]: history TTL in ms; ARGV[5]:
# the key prefix ("<prefix>:"); then triples (deadline in Redis ms, envelope, page group or "").
# Returns {Redis time in ms, then per envelope its sequence number, or 0: refused, its deadline
# had passed}.
# Recovery extension (tornado_rt.history): an envelope to a page group that keeps a history (hash
# <prefix>pos:<group>: e = epoch, o = offset; created by tornado_rt.redis_history when a
# connection with positions subscribes, kept alive while one is subscribed) gets the group's next
# offset and is appended to the group's history (stream <prefix>hist:<group>, trimmed to the
# history size; both keys expire after the history TTL); its entry carries p = epoch, q = offset.
# A group without the hash costs one HGET.
# A new stream starts at (Redis time in ms) * 1000, above anything an earlier stream reached
# unless that one carried more than a million envelopes per second on average; its first entry
# has the field r: the highest sequence number of the old stream its publisher knew of (so a
# reader behind that knows it lost envelopes).
PUBLISH_SCRIPT = """
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
local n
local fresh = false
if top[1] then
  n = tonumber(string.match(top[1][1], '^(%d+)'))
else
  n = now * 1000
  fresh = true
end
local out = {now}
local added = false
local hsize = tonumber(ARGV[3])
for i = 6, #ARGV, 3 do
  if tonumber(ARGV[i]) >= now then
    n = n + 1
    local id = string.format('%.0f-0', n)
    local entry = {'XADD', key, id, 't', now, 'e', ARGV[i + 1]}
    if fresh then
      entry[#entry + 1] = 'r'
      entry[#entry + 1] = ARGV[2]
      fresh = false
    end
    local group = ARGV[i + 2]
    if group ~= '' and hsize > 0 then
      local pos = ARGV[5] .. 'pos:' .. group
      local hist = ARGV[5] .. 'hist:' .. group
      local epoch = redis.call('HGET', pos, 'e')
      if epoch then
        local offset = redis.call('HINCRBY', pos, 'o', 1)
        redis.call('XADD', hist, 'MAXLEN', hsize, '*', 'q', offset, 't', now, 'e', ARGV[i + 1])
        redis.call('PEXPIRE', pos, ARGV[4])
        redis.call('PEXPIRE', hist, ARGV[4])
        entry[#entry + 1] = 'p'
        entry[#entry + 1] = epoch
        entry[#entry + 1] = 'q'
        entry[#entry + 1] = offset
      end
    end
    redis.call(unpack(entry))
    out[#out + 1] = n
    added = true
  else
    out[#out + 1] = 0
  end
end
if added then
  redis.call('XTRIM', key, 'MAXLEN', '~', ARGV[1])
end
return out
"""
PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()

# KEYS[1]: the directory hash. ARGV[1]: the stream position the snapshot corresponds to; ARGV[2]:
# the snapshot. Replaces the stored one only when it is older: returns 1 when written.
SNAPSHOT_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'p')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'p', ARGV[1], 's', ARGV[2], 'h', ARGV[3])
return 1
"""
# KEYS[1]: the directory hash. ARGV[1]: a stream position; ARGV[2]: the SHA-1 of the writer's
# snapshot at that position. When the stored snapshot is older and the same (same SHA-1), only
# its position moves forward (so a process that starts reads less of the stream), without sending
# the snapshot. Returns 1 when moved.
ADVANCE_SCRIPT = """
local current = redis.call('HMGET', KEYS[1], 'p', 'h')
if current[1] and tonumber(current[1]) < tonumber(ARGV[1]) and current[2] == ARGV[2] then
  redis.call('HSET', KEYS[1], 'p', ARGV[1])
  return 1
end
return 0
"""
#: Stream entries read after which the snapshot's position is moved forward even without a
#: directory change (a process that starts replays at most about this many).
SNAPSHOT_EVERY = 10_000

def encode_envelope(envelope: Envelope, origin: str, seq: int) -> bytes:
    """The stream entry's ``e`` field: a JSON header line (the envelope without its message text,
    plus the publisher's origin ``o`` and its sequence number ``n``), a newline, the text."""
    wire = envelope.to_wire()
    data = wire.pop("d", None)
    wire["o"] = origin
    wire["n"] = seq
    payload = ujson.dumps(wire, ensure_ascii=False).encode()
    if data is not None:
        payload += b"\n" + data.encode()
    return payload


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _seq_of(entry_id: bytes) -> Tuple[int, bool]:
    """(n, whether the id is one of ours: ``<n>-0``) of a stream entry id; ValueError if no id."""
    head, _, tail = entry_id.partition(b"-")
    return int(head), tail == b"0"


class _Pending:
    """A publish of this process: its future, its deadline (loop time), the envelope, and the
    stream sequence number Redis gave it (0 until accepted)."""

    __slots__ = ("future", "deadline", "envelope", "accepted")

    def __init__(self, future: "asyncio.Future[None]", deadline: float, envelope: Envelope):
        self.future = future
        self.deadline = deadline
        self.envelope = envelope
        self.accepted = 0


class RedisBroker(Broker):
    """Event bus over one Redis Stream shared by every process (see the module docstring).

    ``url``: ``redis://[[user]:[password]@]host[:port][/db]``, ``rediss://…`` (TLS) or
    ``unix:///path.sock`` — anything redis-py's ``ConnectionPool.from_url`` takes.
    ``channel_prefix``: processes with the same prefix on the same Redis form one server
    (default ``"tornado-rt"``; the stream is ``"<prefix>:stream"``).
    ``publish_timeout``: the longest a publish waits, in seconds (default 2.0; see the module
    docstring). ``stream_length``: entries the stream keeps at least (approximate trimming,
    default 100,000): how far behind a process may fall (a stall) before it has a gap.
    ``connect_timeout``: seconds for the TCP connect (default 1.0); ``socket_timeout``: seconds
    for the rest of a Redis exchange outside publishing — the connection handshake, finding the
    read position (default 2.0).
    ``reconnect_min`` / ``reconnect_max``: backoff of the reader between attempts (0.1 → 5 s).
    ``health_check_interval``: the reader's ``BLOCK`` time; a reader that gets no reply within
    twice this replaces its connection (default 5).
    ``start_timeout``: how long :meth:`start` keeps trying to connect before it raises
    ``BrokerUnavailable`` (default 5).
    ``share_directory``: keep the server's in-memory directory's snapshot in Redis (see
    :meth:`share_directory` and docs/redis.md); ``snapshot_every``: stream entries after which the
    stored snapshot's position is moved forward without a change (default 10,000).
    """

    def __init__(self, url: str, channel_prefix: str = _PREFIX, *,
                 publish_timeout: float = 2.0, stream_length: int = _STREAM_LENGTH,
                 socket_timeout: float = 2.0, connect_timeout: float = 1.0,
                 reconnect_min: float = 0.1, reconnect_max: float = 5.0,
                 health_check_interval: float = 5.0, start_timeout: float = 5.0,
                 share_directory: bool = False, snapshot_every: int = SNAPSHOT_EVERY):
        if not channel_prefix or not isinstance(channel_prefix, str):
            raise ValueError("channel_prefix must be a non-empty string")
        if not publish_timeout > 0:
            raise ValueError("publish_timeout must be positive")
        if not isinstance(stream_length, int) or stream_length < 1:
            raise ValueError("stream_length must be a positive integer")
        self.url = url
        self.channel_prefix = channel_prefix
        #: The recovery extension's history in Redis (size, TTL in ms); set by configure().
        self.history_size = 0
        self.history_ttl_ms = 300_000
        self.stream = f"{channel_prefix}:stream"
        #: The hash holding the directory snapshot shared by the cluster: ``p`` (the stream
        #: position it corresponds to) and ``s`` (the snapshot, JSON).
        self.directory_key = f"{channel_prefix}:directory"
        self.share_directory_snapshot = share_directory
        self.snapshot_every = snapshot_every
        # protocol=2: plain arrays. No command retries: fail fast. socket_timeout=None: redis-py
        # would arm a timer for every reply read; the broker bounds each exchange itself.
        self._pool = ConnectionPool.from_url(
            url, socket_connect_timeout=connect_timeout, socket_keepalive=True, retry=None,
            client_name="tornado-rt")
        kwargs = self._pool.connection_kwargs
        kwargs["protocol"] = 2
        kwargs["socket_timeout"] = None
        self.publish_timeout = publish_timeout
        self.stream_length = stream_length
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self._script_head = (_bulk(b"EVALSHA") + _bulk(PUBLISH_SHA.encode()) + _bulk(b"1")
                             + _bulk(self.stream.encode()) + _bulk(str(stream_length).encode()))
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.health_check_interval = health_check_interval
        self.start_timeout = start_timeout
        self.origin = uuid.uuid4().hex[:16]
        self._seq = itertools.count(1)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        # seq -> publish; insertion order is publish order, hence deadline order.
        self._pending: Dict[int, _Pending] = {}
        self._outbox: Deque[Tuple[int, bytes]] = collections.deque()
        self._timer: Optional[asyncio.TimerHandle] = None
        self._wake: Optional[asyncio.Event] = None
        self._subscribed = False
        self._ready: Optional[asyncio.Event] = None
        self._closed = False
        self._tasks: List[asyncio.Task] = []
        self._sub_conn: Any = None
        self._pub_conn: Any = None
        self._offset: float = 0.0  # a lower bound of (Redis clock - loop clock), in ms
        self._last_error: Optional[str] = None
        #: The stream sequence number this process has read up to (0: none yet).
        self.position = 0
        self._accepted = 0  # the highest sequence number Redis gave a publish of this process
        self._last_id = b"0-0"
        self._positioned = False
        # Whether the last read reached the end of the stream (nothing was waiting unread), the
        # loop did not stall between sending that read and sending the next one (a pending XREAD
        # is answered with whatever is added later, so nothing can slip past it), and the reader
        # has not lost its connection by a timeout since (Redis may have gone on without it):
        # then a stream that starts over has lost nothing this process needed.
        self._caught_up = True
        self._stalls = 0  # loop stalls seen by _tick
        self._last_tick = 0.0
        #: Numbers for monitoring: reader connections made (1 + reconnects), gaps, envelopes known
        #: lost in gaps, streams started over.
        self.subscriptions = 0
        self.gaps = 0
        self.lost = 0
        self.resets = 0
        # The shared directory (share_directory=True and a server with the in-memory directory).
        self._directory: Any = None
        self._router: Any = None
        self._loaded: Optional[asyncio.Event] = None  # start-up snapshot loaded and caught up
        self._ready_at = 0  # the stream position to reach before start() returns
        self._snap_wake: Optional[asyncio.Event] = None
        self._snap_position = 0  # the position of the stored snapshot, as far as this process knows
        self._snap_changed = False  # a change to write (else only move the stored one forward)
        self._resync: Optional[int] = None  # a gap seen at this entry: sync the directory first
        self._deferred_gap: Optional[Tuple[Optional[int], int]] = None  # its page_discard, after
        #: Directory snapshots written to Redis by this process, and failed attempts.
        self.snapshots_written = 0
        self.snapshot_advances = 0  # ... and times only its position was moved forward
        self.snapshot_failures = 0

    def share_directory(self, directory: Any, router: Any) -> None:
        """Called by the server when it is built (with its in-memory directory and its router):
        with ``share_directory=True``, keep the cluster's directory snapshot in Redis — load it
        at start before :meth:`start` returns, write it after every change, re-seed it when Redis
        lost it, load it after a gap (see docs/redis.md)."""
        if not self.share_directory_snapshot:
            return
        self._directory = directory
        self._router = router
        directory.watch(self._directory_changed)

    def _directory_changed(self) -> None:
        """The directory changed (or Redis lost the snapshot): write it."""
        self._snap_changed = True
        if self._snap_wake is not None:
            self._snap_wake.set()

    # --- state ----------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether this process is reading the stream right now (publishing is possible)."""
        return self._subscribed

    def _unavailable(self, why: str) -> BrokerUnavailable:
        return BrokerUnavailable(f"Redis broker unavailable ({redact_url(self.url)}): {why}")

    def history_store(self, size: int, ttl: float, live: Any = tuple) -> Any:
        """Cluster-wide positions and history in the same Redis (:mod:`tornado_rt.redis_history`):
        from now on the publish script numbers page messages and keeps their history."""
        from .redis_history import RedisHistory
        self.history_size = size
        self.history_ttl_ms = max(1, int(ttl * 1000))
        return RedisHistory(self.url, self.channel_prefix, ttl, live)

    def presence_store(self, ttl: float) -> Any:
        """Cluster-wide presence in the same Redis (:mod:`tornado_rt.redis_presence`)."""
        from .redis_presence import RedisPresence
        return RedisPresence(self.url, self.channel_prefix, self.origin, ttl)

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, find the read position, and start the publisher. Raises ``BrokerUnavailable``
        when Redis cannot be reached within ``start_timeout`` seconds (nothing is left running)."""
        if self._tasks:
            return
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._loaded = asyncio.Event()
        self._snap_wake = asyncio.Event()
        self._last_tick = self._loop.time()
        self._tasks = [self._loop.create_task(self._read_forever()),
                       self._loop.create_task(self._write_forever()),
                       self._loop.create_task(self._tick())]
        if self._directory is not None:
            self._tasks.append(self._loop.create_task(self._write_snapshots()))
        try:
            async with asyncio.timeout(self.start_timeout):
                await self._ready.wait()
        except TimeoutError:
            await self.close()
            raise self._unavailable(f"not reachable within {self.start_timeout:g} s "
                                    f"({self._last_error or 'no reply'})") from None
        if not self._loaded.is_set():
            # The directory snapshot was loaded: apply what followed it before serving anyone.
            limit = max(60.0, self.start_timeout)
            log.info("reading the Redis stream from the directory snapshot's position %d up to %d",
                     self.position, self._ready_at)
            try:
                async with asyncio.timeout(limit):
                    await self._loaded.wait()
            except TimeoutError:
                await self.close()
                raise self._unavailable(f"could not read the stream up to position {self._ready_at} "
                                        f"within {limit:g} s (at {self.position})") from None

    async def close(self) -> None:
        """Stop the reader and the publisher; pending publishes fail with BrokerUnavailable."""
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # gather: the tasks' own CancelledError is collected, a cancellation of close() is not.
        await asyncio.gather(*tasks, return_exceptions=True)
        self._subscribed = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        error = self._unavailable("broker closed")
        for seq in list(self._pending):
            self._fail(seq, error)
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
        payload = encode_envelope(envelope, self.origin, seq)
        loop = self._loop
        assert loop is not None and self._wake is not None
        future = loop.create_future()
        future.add_done_callback(_retrieve)  # a caller may drop it: no "never retrieved" noise
        deadline = loop.time() + self.publish_timeout
        self._pending[seq] = _Pending(future, deadline, envelope)
        self._outbox.append((seq, payload))
        self._wake.set()
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        return future

    def _expire(self) -> None:
        """At a publish's deadline: accepted by Redis → it succeeded (delivery follows when this
        process reads it); not accepted → it failed, and Redis will refuse it if it runs it later."""
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        done = []
        for seq, entry in self._pending.items():
            if entry.deadline > now:
                self._timer = loop.call_at(entry.deadline, self._expire)
                break
            done.append((seq, entry))
        if not done:
            return
        error = self._unavailable(f"no answer from Redis within {self.publish_timeout:g} s "
                                  "(the publish will not be applied later)")
        for seq, entry in done:
            if entry.accepted:
                del self._pending[seq]
                if not entry.future.done():
                    entry.future.set_result(None)
            else:
                self._fail(seq, error)

    async def _write_forever(self) -> None:
        """The one writer: sends queued publishes in call order, a batch per script call."""
        assert self._wake is not None and self._loop is not None
        wake, outbox, pending, loop = self._wake, self._outbox, self._pending, self._loop
        while True:
            await wake.wait()
            wake.clear()
            while outbox:
                batch: List[Tuple[int, bytes, _Pending]] = []
                now = loop.time()
                while outbox and len(batch) < MAX_BATCH:
                    seq, payload = outbox.popleft()
                    entry = pending.get(seq)
                    if entry is not None and not entry.future.done() and entry.deadline > now:
                        batch.append((seq, payload, entry))
                if not batch:
                    continue
                sent = False
                try:
                    # Every step is bounded by the first deadline of the batch.
                    async with asyncio.timeout_at(batch[0][2].deadline):
                        conn = self._pub_conn
                        if conn is None:
                            conn = await self._connect_publisher()
                            self._pub_conn = conn
                        sent = True  # from here on Redis may run the script (ambiguous on error)
                        await self._send(conn, batch)
                except asyncio.CancelledError:
                    raise
                except ResponseError as exc:  # Redis answered with an error: nothing was applied
                    self._last_error = _describe(exc)
                    log.warning("publish to Redis refused: %s", self._last_error)
                    await self._drop_publisher()
                    error = self._unavailable(f"publish refused ({self._last_error})")
                    for seq, _, _ in batch:
                        self._fail(seq, error)
                except Exception as exc:  # the writer must survive anything: Redis, OS, timeouts
                    if isinstance(exc, TimeoutError):
                        exc = TimeoutError(f"no reply from Redis within {self.publish_timeout:g} s")
                    self._last_error = _describe(exc)
                    log.warning("publish to Redis failed: %s", self._last_error,
                                exc_info=not isinstance(exc, (RedisError, OSError, TimeoutError)))
                    await self._drop_publisher()
                    if not sent:  # never reached Redis: certainly not applied
                        error = self._unavailable(f"publish failed ({self._last_error})")
                        for seq, _, _ in batch:
                            self._fail(seq, error)
                    else:
                        # Redis may still run the script, refusing each envelope past its deadline:
                        # each fails at its deadline (_expire). Nothing more is sent before the last
                        # of those deadlines, so nothing sent later can overtake these in Redis.
                        await asyncio.sleep(max(0.0, batch[-1][2].deadline - loop.time()))

    async def _drop_publisher(self) -> None:
        conn, self._pub_conn = self._pub_conn, None
        if conn is not None:
            await _disconnect(conn)

    async def _connect_publisher(self) -> Any:
        """A publishing connection: connected, the script loaded, the clock offset measured."""
        conn = await self._connect()
        try:
            await conn.send_command("SCRIPT", "LOAD", PUBLISH_SCRIPT, check_health=False)
            sha = await conn.read_response()
            if (sha.decode() if isinstance(sha, bytes) else sha) != PUBLISH_SHA:
                raise _protocol_error(f"unexpected reply to SCRIPT LOAD: {sha!r}")
            await conn.send_command("TIME", check_health=False)
            reply = await conn.read_response()
            self._offset = int(reply[0]) * 1000 + int(reply[1]) / 1000 - _now(self._loop) * 1000
        except BaseException:
            await _disconnect(conn)
            raise
        return conn

    async def _connect(self) -> Any:
        conn = self._pool.make_connection()
        try:
            async with asyncio.timeout(self.connect_timeout + self.socket_timeout):
                await conn.connect()  # TCP connect, then the handshake (CLIENT SETNAME, AUTH, SELECT)
        except BaseException:
            await _disconnect(conn)
            raise
        return conn

    async def _send(self, conn: Any, batch: List[Tuple[int, bytes, _Pending]]) -> None:
        """One script call for the batch; marks each publish accepted or fails it (refused)."""
        offset = self._offset - DEADLINE_MARGIN_MS
        parts = [b"*%d\r\n" % (9 + 3 * len(batch)), self._script_head,
                 _bulk(b"%d" % max(self.position, self._accepted)), _bulk(b"%d" % self.history_size),
                 _bulk(b"%d" % self.history_ttl_ms), _bulk(self.channel_prefix.encode() + b":")]
        for _, payload, entry in batch:
            # Redis must refuse an envelope once the publisher may have answered 503 for it:
            # offset is a lower bound of the true offset, so this is never later than that.
            parts.append(_bulk(b"%d" % int(entry.deadline * 1000 + offset)))
            parts.append(_bulk(payload))
            audience = entry.envelope.audience
            group = audience[1] if audience and audience[0] == "page" and entry.envelope.kind == "message" else ""
            parts.append(_bulk(group.encode() if self.history_size else b""))
        await conn.send_packed_command([b"".join(parts)], check_health=False)
        reply = await conn.read_response()
        # Redis ran the script between sending and now: Redis time - now is a lower bound.
        self._offset = reply[0] - _now(self._loop) * 1000
        refused = None
        for (seq, _, entry), n in zip(batch, reply[1:]):
            if n:
                entry.accepted = n
                if n > self._accepted:
                    self._accepted = n
            else:
                if refused is None:
                    refused = self._unavailable(f"Redis ran the publish after its deadline "
                                                f"({self.publish_timeout:g} s): not applied")
                self._fail(seq, refused)

    # --- reading ----------------------------------------------------------------------------------
    async def _tick(self) -> None:
        """Notice loop stalls: a tick that comes more than STALL seconds late counts one."""
        loop = self._loop
        assert loop is not None
        period = STALL / 5
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            if now - self._last_tick > period + STALL:
                self._stalls += 1
            self._last_tick = now

    def _fresh(self, stalls_before: int) -> bool:
        """No loop stall since ``stalls_before`` was read, nor one going on unnoticed yet."""
        return self._stalls == stalls_before and _now(self._loop) - self._last_tick < STALL

    async def _read_forever(self) -> None:
        delay = self.reconnect_min
        while not self._closed:
            conn = self._pool.make_connection()
            self._sub_conn = conn
            try:
                async with asyncio.timeout(self.connect_timeout + self.socket_timeout):
                    await conn.connect()  # TCP connect, then the handshake (CLIENT SETNAME, AUTH, SELECT)
                await self._check_position(conn, self.socket_timeout)
                if self._directory is not None and self.subscriptions:
                    await self._sync_directory(conn, self.socket_timeout, None)
                self._subscribed = True
                self.subscriptions += 1
                self._last_error = None
                if self.subscriptions > 1:
                    log.warning("reading the Redis stream %s again from position %d", self.stream,
                                self.position)
                else:
                    log.info("reading the Redis stream %s at %s from position %d", self.stream,
                             redact_url(self.url), self.position)
                assert self._ready is not None and self._loaded is not None
                self._ready.set()
                if self.position >= self._ready_at:
                    self._loaded.set()
                delay = self.reconnect_min
                await self._read(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the reader must survive anything: Redis, OS, timeouts
                if isinstance(exc, TimeoutError):
                    exc = TimeoutError("no reply from Redis in time")
                    self._caught_up = False  # Redis may have gone on without this process
                self._last_error = _describe(exc)
                if not isinstance(exc, (RedisError, OSError, TimeoutError)):
                    log.error("unexpected error on the Redis stream reader", exc_info=exc)
                if self._subscribed:
                    log.warning("Redis stream reader lost its connection: %s; reconnecting",
                                self._last_error)
                else:
                    # Before the first connection start() reports the failure itself.
                    log.log(logging.WARNING if self.subscriptions else logging.DEBUG,
                            "cannot read from Redis at %s: %s; retrying in %.1f s",
                            redact_url(self.url), self._last_error, delay)
            finally:
                self._subscribed = False
                self._sub_conn = None
                await _disconnect(conn)
            if self._closed:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max)

    async def _stream_top(self, conn: Any, timeout: float) -> Optional[bytes]:
        """The id of the stream's last entry, or None when it has none."""
        await conn.send_command("XREVRANGE", self.stream, "+", "-", "COUNT", 1, check_health=False)
        async with asyncio.timeout(timeout):
            reply = await conn.read_response()
        return reply[0][0] if reply else None

    async def _check_position(self, conn: Any, timeout: float) -> None:
        """At the first connection, start at the end of the stream. Later (reconnect, idle),
        notice a stream that started over below this process's position (it would never
        return an entry to this position: see _reset)."""
        top = await self._stream_top(conn, timeout)
        if not self._positioned and self._directory is not None:
            stored = await self._read_snapshot(conn, timeout)
            if stored is not None:
                position, snapshot = stored
                try:
                    self._directory.load_quietly(snapshot)
                except ValueError as exc:
                    log.error("the directory snapshot in Redis (%s) is not valid, ignored: %s",
                              self.directory_key, exc)
                else:
                    self._positioned = True
                    self.position = self._snap_position = position
                    self._last_id = b"%d-0" % position
                    self._ready_at = _seq_of(top)[0] if top is not None else 0
                    counts = {k: len(v) for k, v in snapshot.items() if isinstance(v, dict)}
                    log.info("directory loaded from Redis (%s at position %d): %s", self.directory_key,
                             position, ", ".join(f"{n} {k}" for k, n in counts.items()) or "empty")
                    return
        if not self._positioned:
            self._positioned = True
            if top is not None:
                self.position = self._snap_position = _seq_of(top)[0]
                self._last_id = top
            return
        if top is not None and _seq_of(top)[0] < self.position:
            self._reset(0, self.position)
            self.position = 0
            self._last_id = b"0-0"

    async def _read(self, conn: Any) -> None:
        """Deliver every entry after this process's position until the connection breaks."""
        interval = self.health_check_interval
        block = str(max(1, int(interval * 1000)))
        count = READ_COUNT
        read = conn.read_response
        while True:
            stalls = self._stalls
            await conn.send_command("XREAD", "COUNT", count, "BLOCK", block, "STREAMS", self.stream,
                                    self._last_id, check_health=False)
            async with asyncio.timeout(2 * interval):
                reply = await read()
            if reply is None:  # nothing new within the BLOCK time
                self._caught_up = self._fresh(stalls)
                await self._check_position(conn, interval)
                continue
            entries = reply[0][1]
            size = self._on_entries(entries)
            if self._resync is not None:
                at, self._resync = self._resync, None
                try:
                    await self._sync_directory(conn, interval, at)
                finally:
                    deferred, self._deferred_gap = self._deferred_gap, None
                    if deferred is not None:
                        self._discard(*deferred)
            self._caught_up = len(entries) < count and self._fresh(stalls)
            count = max(1, min(READ_COUNT, READ_BYTES * len(entries) // max(1, size)))

    def _on_entries(self, entries: List[Any]) -> int:
        """Deliver stream entries in order; returns the bytes of envelope text they held."""
        size = 0
        for entry_id, fields in entries:
            previous = self._last_id
            self._last_id = entry_id
            try:
                seq, ours = _seq_of(entry_id)
                if not ours or len(fields) < 4 or fields[0] != b"t" or fields[2] != b"e":
                    raise ValueError("not an envelope entry")
                at = int(fields[1]) / 1000
                payload = fields[3]
            except (ValueError, TypeError, IndexError):
                log.error("ignored a malformed entry %r on Redis stream %s", entry_id, self.stream)
                continue
            size += len(payload)
            position = None
            for j in range(4, len(fields) - 1, 2):
                if fields[j] == b"p":
                    try:
                        position = (fields[j + 1].decode(), int(fields[j + 3]))
                    except (ValueError, IndexError, UnicodeDecodeError):
                        position = None
            expected = self.position + 1
            self.position = seq
            if seq != expected and expected != 1:
                troubles = self.gaps + self.resets
                if self._directory is not None:
                    self._resync = seq  # defers the gap's page_discard (see _gap)
                if len(fields) > 5 and fields[4] == b"r":
                    self._reset(int(fields[5]), expected - 1)
                elif seq > expected:
                    self._gap(seq - expected, expected - 1)
                if self.gaps + self.resets == troubles:
                    self._resync = None
                elif self._directory is not None:
                    # Directory changes may be among what was lost (or Redis lost the snapshot):
                    # sync the directory with the snapshot before going on (_sync_directory).
                    self.position, self._last_id = expected - 1, previous
                    break
            self._on_envelope(payload, at, position)
        if self._loaded is not None and not self._loaded.is_set() and self.position >= self._ready_at:
            self._loaded.set()
        if self._directory is not None and self.position - self._snap_position >= self.snapshot_every:
            self._snap_position = self.position  # once per snapshot_every, whatever the write does
            if self._snap_wake is not None:
                self._snap_wake.set()
        return size

    def _on_envelope(self, payload: bytes, at: float, position: Optional[Tuple[str, int]] = None) -> None:
        entry = None
        try:
            cut = payload.find(b"\n")
            wire = ujson.loads(payload if cut < 0 else payload[:cut])
            if wire.get("o") == self.origin:
                entry = self._pending.pop(wire.get("n"), None)
            if entry is not None:
                envelope = entry.envelope  # our own: the original, no need to decode it
            else:
                if cut >= 0:
                    wire["d"] = payload[cut + 1:].decode()
                envelope = Envelope.from_wire(wire)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            log.error("ignored a malformed envelope on Redis stream %s", self.stream)
            return
        envelope.position = position
        key = envelope.id
        if key is not None and self.recent.seen(key, at):
            self.duplicates += 1
        else:
            deliver = self._deliver
            if deliver is not None:
                try:
                    deliver(envelope)
                except Exception:
                    log.exception("delivery of %r failed", envelope)
        if entry is not None and not entry.future.done():
            entry.future.set_result(None)

    def _gap(self, lost: Optional[int], position: int) -> None:
        """Envelopes this process never received: count, log once, drop every page subscription."""
        self.gaps += 1
        if lost:
            self.lost += lost
        if self._directory is not None and self._resync is not None:
            # The directory is synced first (_sync_directory), then the clients are told: their
            # resubscriptions are answered with the synced directory.
            self._deferred_gap = (lost, position)
            return
        self._discard(lost, position)

    def _discard(self, lost: Optional[int], position: int) -> None:
        discarded = 0
        if self.on_gap is not None:
            try:
                discarded = self.on_gap() or 0
            except Exception:
                log.exception("the gap handler failed")
        what = "an unknown number of envelopes" if lost is None else f"{lost} envelopes"
        directory = ("the directory is synced with its snapshot in Redis" if self._directory is not None
                     else "directory events among them were not applied here either: PUT "
                     "/api/directory again if they may have been published")
        log.warning("Redis stream %s: %s after position %d were lost before this process read them "
                    "(gap %d, %d envelopes lost in gaps so far); sent page_discard for %d page "
                    "subscriptions so that clients resubscribe and refetch; %s.", self.stream, what,
                    position, self.gaps, self.lost, discarded, directory)

    def _reset(self, known: int, position: int) -> None:
        """The stream started over (Redis restarted without persistence, FLUSHALL, key deleted).
        ``known``: the highest sequence number of the old stream that the publisher who started
        the new one knew of (0: unknown); ``position``: where this process had read up to."""
        self.resets += 1
        if known > position:
            self._gap(known - position, position)
        elif not self._caught_up:
            self._gap(None, position)
        else:
            log.warning("Redis stream %s started over (Redis restarted without persistence, FLUSHALL "
                        "or the stream deleted); this process had read all of it (position %d): "
                        "nothing was lost here", self.stream, position)

    # --- the shared directory ----------------------------------------------------------------------
    async def _read_snapshot(self, conn: Any, timeout: float) -> Optional[Tuple[int, Dict[str, Any]]]:
        """(position, snapshot) of the directory kept in Redis, or None when there is none. A
        snapshot that is not JSON is logged and treated as none."""
        await conn.send_command("HMGET", self.directory_key, "p", "s", check_health=False)
        async with asyncio.timeout(timeout):
            position, text = await conn.read_response()
        if position is None or text is None:
            return None
        try:
            snapshot = ujson.loads(text)
            if not isinstance(snapshot, dict):
                raise ValueError("not a JSON object")
            return int(position), snapshot
        except ValueError as exc:
            log.error("the directory snapshot in Redis (%s) is not valid JSON, ignored: %s",
                      self.directory_key, exc)
            return None

    async def _sync_directory(self, conn: Any, timeout: float, gap_at: Optional[int]) -> None:
        """After a reconnect (``gap_at`` None) or a gap / a stream that started over, seen at the
        entry ``gap_at`` (this process has read up to ``position``, before it): Redis has no
        snapshot → write this process's (re-seed: Redis restarted without persistence). A
        snapshot newer than ``position`` after a gap → load it and go on from the later of its
        position and the gap's end: the changes this process missed are in it. Every process writes
        the snapshot after each change, so a gap that holds a change is covered by a newer one."""
        directory = self._directory
        stored = await self._read_snapshot(conn, timeout)
        if stored is None:
            log.warning("Redis has no directory snapshot (%s): writing this process's directory "
                        "(position %d)", self.directory_key, self.position)
            self._directory_changed()
        elif gap_at is not None and stored[0] > self.position:
            position, snapshot = stored
            try:
                directory.load_quietly(snapshot)
            except ValueError as exc:
                log.error("the directory snapshot in Redis (%s) is not valid, ignored: %s",
                          self.directory_key, exc)
            else:
                skipped = max(0, position - gap_at + 1)
                self.lost += skipped
                self.position = max(position, gap_at - 1)
                self._last_id = b"%d-0" % self.position
                log.warning("directory loaded from Redis after the gap (%s at position %d)%s",
                            self.directory_key, position,
                            f"; the {skipped} envelopes it already holds are not delivered here"
                            if skipped else "")
        if gap_at is not None and self.position < gap_at - 1:
            # Go on from the entry after the gap (the gap is counted; not seen again).
            self.position = gap_at - 1
            self._last_id = b"%d-0" % self.position

    async def _write_snapshots(self) -> None:
        """Write this process's directory to Redis after changes (coalesced: one write in
        flight), with the stream position it corresponds to. The script keeps the snapshot with
        the highest position: every process applies the same changes at the same positions, so
        whichever writes first, the snapshot at a position is the same."""
        wake, loaded, router = self._snap_wake, self._loaded, self._router
        assert wake is not None and loaded is not None
        delay = self.reconnect_min
        conn: Any = None
        while True:
            await wake.wait()
            await loaded.wait()  # never before the start-up snapshot is loaded and caught up
            while router is not None and router.busy:  # an envelope half-applied: wait for it
                await router.wait_idle()
            wake.clear()
            changed, self._snap_changed = self._snap_changed, False
            try:
                if conn is None:
                    conn = await self._connect()
                async with asyncio.timeout(self.socket_timeout):
                    # Is a newer snapshot there already (another process wrote it)? Then this
                    # one need not even be serialized.
                    await conn.send_command("HMGET", self.directory_key, "p", "h", check_health=False)
                    current, digest = await conn.read_response()
                    if router is not None and router.busy:  # changed meanwhile: start over
                        self._snap_changed |= changed
                        wake.set()
                        continue
                    if current is None and not changed:
                        continue  # only moving forward, and there is nothing to move: no seeding
                    # The state and its position, taken together (no await in between).
                    position = self.position
                    if current is None or int(current) < position:
                        text = ujson.dumps(self._directory.snapshot(), ensure_ascii=False, sort_keys=True)
                        mine = hashlib.sha1(text.encode()).hexdigest().encode()
                        if digest == mine:  # the same directory: only move its position forward
                            await conn.send_command("EVAL", ADVANCE_SCRIPT, 1, self.directory_key, position,
                                                    mine, check_health=False)
                        else:
                            await conn.send_command("EVAL", SNAPSHOT_SCRIPT, 1, self.directory_key, position,
                                                    text, mine, check_health=False)
                        if await conn.read_response():
                            if digest == mine:
                                self.snapshot_advances += 1
                            else:
                                self.snapshots_written += 1
                    self._snap_position = max(position, int(current or 0))
                delay = self.reconnect_min
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.snapshot_failures += 1
                if isinstance(exc, TimeoutError):
                    exc = TimeoutError("no reply from Redis in time")
                self._snap_changed |= changed
                log.warning("could not write the directory snapshot to Redis: %s; retrying in %.1f s",
                            _describe(exc), delay,
                            exc_info=not isinstance(exc, (RedisError, OSError, TimeoutError)))
                if conn is not None:
                    await _disconnect(conn)
                    conn = None
                wake.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max)

    # --- pending publishes ----------------------------------------------------------------------
    def _fail(self, seq: int, error: BaseException) -> None:
        entry = self._pending.pop(seq, None)
        if entry is not None and not entry.future.done():
            entry.future.set_exception(error)


def _now(loop: Optional[asyncio.AbstractEventLoop]) -> float:
    assert loop is not None
    return loop.time()


def _retrieve(future: "asyncio.Future[None]") -> None:
    if not future.cancelled():
        future.exception()


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


class _Publishing:
    """What the sync and the asyncio write-only publishers share: the registry, validation and
    serialization, the script's arguments and the reading of its reply."""

    def __init__(self, url: str, channel_prefix: str, plugins: Any, registry: Any,
                 load_entry_points: bool, types: Optional[str], publish_timeout: float,
                 stream_length: int, history_size: int = _HISTORY_SIZE, history_ttl: float = _HISTORY_TTL):
        from .registry import Registry, entry_point_plugins
        from .server import builtin_plugins

        if not channel_prefix or not isinstance(channel_prefix, str):
            raise ValueError("channel_prefix must be a non-empty string")
        if not publish_timeout > 0:
            raise ValueError("publish_timeout must be positive")
        if not isinstance(stream_length, int) or stream_length < 1:
            raise ValueError("stream_length must be a positive integer")
        if registry is None:
            chosen = builtin_plugins() + list(plugins)
            if load_entry_points:
                chosen += entry_point_plugins(exclude=[p.name for p in chosen])
            if types is not None:
                from .typesconfig import load_types_file

                known = {pt.name: pt for p in chosen for pt in p.page_types}
                taken = [n for p in chosen for mt in p.message_types for n in (mt.name, *mt.aliases)]
                # Webhook-guarded pages: who may subscribe does not matter to a publisher.
                chosen.append(load_types_file(types, webhook=lambda name: _deny, known_pages=known,
                                              known_messages=taken))
            registry = Registry(chosen)
        self.registry = registry
        self.url = url
        self.stream = f"{channel_prefix}:stream"
        self.publish_timeout = publish_timeout
        self.stream_length = stream_length
        if not isinstance(history_size, int) or history_size < 0 or not history_ttl > 0:
            raise ValueError("history_size must be an integer >= 0 and history_ttl positive")
        # The recovery extension: a page message gets its page's next offset and joins its history
        # in the same script call as when a server publishes it (the servers' settings).
        self.history_size = history_size
        self.history_ttl_ms = int(history_ttl * 1000)
        self.key_prefix = channel_prefix + ":"
        self.origin = uuid.uuid4().hex[:16]
        self._seq = itertools.count(1)
        self._known = 0  # the highest sequence number Redis gave this publisher
        self._offset: Optional[float] = None  # a lower bound of (Redis clock - monotonic), in ms

    def _unavailable(self, why: str) -> BrokerUnavailable:
        return BrokerUnavailable(f"Redis broker unavailable ({redact_url(self.url)}): {why}")

    # --- envelopes ---------------------------------------------------------------------------------
    def _message(self, message: Any, to: Any, ignore_web_socket_id: Optional[str], exclude_user_ids: Any,
                 id: Optional[str]) -> Envelope:
        return message_envelope(self.registry, message, to, ignore_web_socket_id, exclude_user_ids,
                                id=id if id is not None else str(uuid.uuid4()))

    def _many(self, items: Any) -> List[Envelope]:
        envelopes = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or "message" not in item:
                raise PublishError("an item must be an object with a message", f"[{i}]")
            extra = set(item) - {"message", "to", "ignore_web_socket_id", "exclude_user_ids", "id"}
            if extra:
                name = sorted(extra)[0]
                raise PublishError(f"unexpected key {name!r}", f"[{i}].{name}")
            # None (or no id) gets a fresh one; anything else is validated like the other paths
            # (an empty id is refused naming [i].id, never silently replaced).
            key = item.get("id")
            if key is None:
                key = str(uuid.uuid4())
            envelopes.append(message_envelope(self.registry, item["message"], item.get("to"),
                                              item.get("ignore_web_socket_id"), item.get("exclude_user_ids"),
                                              prefix=f"[{i}].", id=key))
        return envelopes

    def _individual(self, payloads: Any, ignore_web_socket_id: Optional[str], id: Optional[str]) -> Envelope:
        return individual_envelope(self.registry, payloads, ignore_web_socket_id,
                                   id=id if id is not None else str(uuid.uuid4()))

    @staticmethod
    def _disconnect(user_ids: Any, ignore_web_socket_ids: Any) -> Envelope:
        users = id_list(list(user_ids), "user_ids", None)
        spared = [w for w in ignore_web_socket_ids if isinstance(w, str)]
        return Envelope(DISCONNECT, user_ids=users, ignore=spared)

    @staticmethod
    def _revoke(user_ids: Any, permission_group: str) -> Envelope:
        users = id_list(list(user_ids), "user_ids", None)
        if not isinstance(permission_group, str) or not permission_group:
            raise PublishError("permission_group must be a non-empty string", "permission_group")
        return Envelope(REVOKE, user_ids=users, permission_group=permission_group)

    # --- the script ------------------------------------------------------------------------------------
    def _args(self, chunk: List[Envelope], began: float) -> List[Any]:
        assert self._offset is not None
        deadline = int((began + self.publish_timeout) * 1000 + self._offset - DEADLINE_MARGIN_MS)
        args: List[Any] = [self.stream_length, self._known, self.history_size, self.history_ttl_ms,
                           self.key_prefix]
        for env in chunk:
            audience = env.audience
            group = audience[1] if (self.history_size and env.kind == MESSAGE and audience
                                    and audience[0] == "page") else ""
            args += [deadline, encode_envelope(env, self.origin, next(self._seq)), group]
        return args

    def _clock(self, reply: Any) -> None:
        """TIME's reply, read just now: a lower bound of the offset between the clocks."""
        import time

        self._offset = int(reply[0]) * 1000 + int(reply[1]) / 1000 - time.monotonic() * 1000

    def _accepted(self, reply: Any) -> None:
        """Read the script's reply (Redis ran it just now); raise unless every envelope was taken."""
        import time

        self._offset = int(reply[0]) - time.monotonic() * 1000
        accepted = [int(n) for n in reply[1:]]
        self._known = max([self._known, *accepted])
        if not all(accepted):
            raise self._unavailable(f"Redis ran the publish after its deadline ({self.publish_timeout:g} s): "
                                    f"{accepted.count(0)} of {len(accepted)} envelopes not applied")

    def _failed(self, exc: BaseException) -> BrokerUnavailable:
        self._offset = None
        if isinstance(exc, TimeoutError) or type(exc).__name__ == "TimeoutError":
            return self._unavailable(f"no reply from Redis within {self.publish_timeout:g} s (it may "
                                     "have applied the publish: retry with the same id)")
        return self._unavailable(_describe(exc))


class RedisPublisher(_Publishing):
    """A write-only publisher for processes that are not servers (a Celery worker, a Django view,
    a script): it validates and serializes with the same registry as the servers and appends the
    same envelopes to the same stream with the same script, so every server process of the
    namespace delivers them, with no HTTP hop. No event loop is needed: it uses redis-py's sync
    client (thread-safe; one pooled connection per concurrent caller). :class:`AsyncRedisPublisher`
    is the same for asyncio code.

    ``url`` / ``channel_prefix``: as for :class:`RedisBroker` (the same Redis and prefix as the
    servers). ``plugins``: plugins beyond the built-in ones (the installed ``tornado_rt.plugins``
    entry points are loaded too unless ``load_entry_points=False``); ``types``: a TOML file of
    configured message and page types (``--types FILE`` of the servers); or pass a ready
    ``registry``. ``publish_timeout``: the longest a publish waits (default 2 s; Redis refuses an
    envelope whose deadline passed, as for the servers). ``stream_length``: as the servers'
    ``--redis-stream-length``; ``history_size`` / ``history_ttl``: as the servers' (the recovery
    extension: page messages join their page's history like the servers' own publishes).

    Every publish gets an idempotency ``id`` (a random UUID unless given; methods return the ids
    used). A ``BrokerUnavailable`` after the command left (a timeout, a broken connection) is
    ambiguous: Redis may have applied it. Retry with the same ``id`` (pass it) and no process
    delivers it twice within the servers' dedup window.

    Raises :class:`~tornado_rt.PublishError` (naming the field) before anything is sent, and
    :class:`~tornado_rt.BrokerUnavailable` when Redis cannot be reached, refuses the command, or
    does not answer within ``publish_timeout``.
    """

    def __init__(self, url: str, channel_prefix: str = _PREFIX, *, plugins: Any = (),
                 registry: Any = None, load_entry_points: bool = True, types: Optional[str] = None,
                 publish_timeout: float = 2.0, connect_timeout: float = 1.0,
                 stream_length: int = _STREAM_LENGTH, history_size: int = _HISTORY_SIZE, history_ttl: float = _HISTORY_TTL):
        import redis as redis_sync

        super().__init__(url, channel_prefix, plugins, registry, load_entry_points, types, publish_timeout,
                         stream_length, history_size, history_ttl)
        self._redis = redis_sync.Redis.from_url(url, socket_connect_timeout=connect_timeout,
                                                socket_timeout=publish_timeout, retry=None, protocol=2,
                                                client_name="tornado-rt-publisher")

    def publish(self, message: Any, to: Any = None, *, ignore_web_socket_id: Optional[str] = None,
                exclude_user_ids: Any = None, id: Optional[str] = None) -> str:
        """Publish one message to its type's default audience or to ``to`` (as
        ``RealtimeServer.publish``); returns its id."""
        env = self._message(message, to, ignore_web_socket_id, exclude_user_ids, id)
        self.send([env])
        return str(env.id)

    def publish_many(self, items: Any) -> List[str]:
        """Several publishes in one script call: ``items`` are dicts with the keys of
        :meth:`publish` (``message``, ``to``, ``ignore_web_socket_id``, ``exclude_user_ids``,
        ``id``). All are validated before any is sent (errors name ``[i].field``); returns the ids."""
        envelopes = self._many(items)
        self.send(envelopes)
        return [str(env.id) for env in envelopes]

    def publish_individual(self, payloads: Any, *, ignore_web_socket_id: Optional[str] = None,
                           id: Optional[str] = None) -> str:
        """Send each user its own message: ``{user_id: message}``; returns the id."""
        env = self._individual(payloads, ignore_web_socket_id, id)
        self.send([env])
        return str(env.id)

    def disconnect(self, user_ids: Any, ignore_web_socket_ids: Any = ()) -> None:
        """Force-disconnect (4003) every connection of these users on every server process."""
        self.send([self._disconnect(user_ids, ignore_web_socket_ids)])

    def revoke(self, user_ids: Any, permission_group: str) -> None:
        """Drop these users' pages in ``permission_group`` (with page_discard) on every process."""
        self.send([self._revoke(user_ids, permission_group)])

    def change_directory(self, operation: str, *args: Any) -> None:
        """A directory change applied by every server process (``RealtimeServer.change_directory``)."""
        self.send([directory_envelope(operation, args)])

    def close(self) -> None:
        self._redis.close()

    def __enter__(self) -> "RedisPublisher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, envelopes: List[Envelope]) -> None:
        """Append prepared envelopes in one script call (at most MAX_BATCH per call). Raises
        ``BrokerUnavailable`` unless Redis accepted every one of them."""
        import time

        from redis.exceptions import NoScriptError

        for start in range(0, len(envelopes), MAX_BATCH):
            chunk = envelopes[start:start + MAX_BATCH]
            began = time.monotonic()
            try:
                if self._offset is None:
                    self._clock(self._redis.time())
                args = self._args(chunk, began)
                try:
                    reply = self._redis.evalsha(PUBLISH_SHA, 1, self.stream, *args)
                except NoScriptError:  # not run: load the script and send again
                    self._redis.script_load(PUBLISH_SCRIPT)
                    reply = self._redis.evalsha(PUBLISH_SHA, 1, self.stream, *args)
            except (RedisError, OSError) as exc:
                raise self._failed(exc) from None
            self._accepted(reply)


class AsyncRedisPublisher(_Publishing):
    """:class:`RedisPublisher` for asyncio code (FastAPI, aiohttp, Tornado): the same arguments;
    the publishing methods are coroutines. Uses redis-py's asyncio client (a pool)."""

    def __init__(self, url: str, channel_prefix: str = _PREFIX, *, plugins: Any = (),
                 registry: Any = None, load_entry_points: bool = True, types: Optional[str] = None,
                 publish_timeout: float = 2.0, connect_timeout: float = 1.0,
                 stream_length: int = _STREAM_LENGTH, history_size: int = _HISTORY_SIZE, history_ttl: float = _HISTORY_TTL):
        import redis.asyncio as redis_async

        super().__init__(url, channel_prefix, plugins, registry, load_entry_points, types, publish_timeout,
                         stream_length, history_size, history_ttl)
        self._redis = redis_async.Redis.from_url(url, socket_connect_timeout=connect_timeout,
                                                 socket_timeout=publish_timeout, retry=None, protocol=2,
                                                 client_name="tornado-rt-publisher")

    async def publish(self, message: Any, to: Any = None, *, ignore_web_socket_id: Optional[str] = None,
                      exclude_user_ids: Any = None, id: Optional[str] = None) -> str:
        env = self._message(message, to, ignore_web_socket_id, exclude_user_ids, id)
        await self.send([env])
        return str(env.id)

    async def publish_many(self, items: Any) -> List[str]:
        envelopes = self._many(items)
        await self.send(envelopes)
        return [str(env.id) for env in envelopes]

    async def publish_individual(self, payloads: Any, *, ignore_web_socket_id: Optional[str] = None,
                                 id: Optional[str] = None) -> str:
        env = self._individual(payloads, ignore_web_socket_id, id)
        await self.send([env])
        return str(env.id)

    async def disconnect(self, user_ids: Any, ignore_web_socket_ids: Any = ()) -> None:
        await self.send([self._disconnect(user_ids, ignore_web_socket_ids)])

    async def revoke(self, user_ids: Any, permission_group: str) -> None:
        await self.send([self._revoke(user_ids, permission_group)])

    async def change_directory(self, operation: str, *args: Any) -> None:
        await self.send([directory_envelope(operation, args)])

    async def close(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> "AsyncRedisPublisher":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def send(self, envelopes: List[Envelope]) -> None:
        import time

        from redis.exceptions import NoScriptError

        for start in range(0, len(envelopes), MAX_BATCH):
            chunk = envelopes[start:start + MAX_BATCH]
            began = time.monotonic()
            try:
                async with asyncio.timeout(self.publish_timeout):
                    if self._offset is None:
                        self._clock(await self._redis.time())
                    args = self._args(chunk, began)
                    try:
                        reply = await self._redis.evalsha(PUBLISH_SHA, 1, self.stream, *args)
                    except NoScriptError:  # not run: load the script and send again
                        await self._redis.script_load(PUBLISH_SCRIPT)
                        reply = await self._redis.evalsha(PUBLISH_SHA, 1, self.stream, *args)
            except (RedisError, OSError, TimeoutError) as exc:
                raise self._failed(exc) from None
            self._accepted(reply)


def _deny(*args: Any) -> bool:
    return False
