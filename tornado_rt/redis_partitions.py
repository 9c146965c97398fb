"""Page groups partitioned over K Redis instances: one Redis core is not enough for every publish.

``tornado-rt serve --broker redis://h1:6379/0,redis://h2:6379/0,redis://h3:6379/0`` (or
``PartitionedRedisBroker([url1, url2, url3])``) spreads the page groups over K >= 2 Redis
instances, each run by today's :class:`~tornado_rt.redis_broker.RedisBroker` (a *shard*); this
module is a composite over them. docs/redis.md ("Partitioning over several Redis instances")
explains it; in short:

Placement
    Page group ``g`` lives on instance ``shard_of(g, K) = crc32(g) mod K``: a plain page message
    to it (one page group, a type without side effect: :func:`~tornado_rt.redis_broker.route_of`)
    goes through that instance's publish script, and the group's registrations, the inboxes its
    messages go to and its history (``pos:``/``hist:``) live there. So a page's messages go through
    one writer per process and one script in Redis, in one inbox per reader: per-page order holds
    as with one instance. **Every process and publisher must list the same URLs in the same
    order**: each instance stores ``<prefix>:partition`` = ``"<i>/<K>"`` and :meth:`start` refuses
    to run when an instance says otherwise.

The control stream
    Everything else — directory changes, disconnect, revoke, presence, messages to users,
    workspaces or everyone, page messages whose type has a side effect — goes on the control stream
    of instance 0, in one total order, as with one instance. Instance 0 alone keeps the directory
    snapshot and the presence of the cluster.

Fences
    What partitioning would break is the order of a control envelope relative to the page
    messages on the other instances (a revocation must not be overtaken by a later message to the
    revoked page). When instance 0 accepts control envelope ``N`` (its entry ``<N>-0``), the
    publisher appends a small *fence* envelope carrying ``N`` to the control stream of every other
    instance (``k: "fence"``; its own numbering, gaps and restart detection there). The writer keeps
    the publisher's call order across instances: a control envelope goes to instance 0 only once
    the page messages submitted before it were answered by their instances (where some are still
    unanswered, an empty fence is sent there as a probe and awaited), so every fence >= its
    entry, whoever writes it, is behind them in their instance's stream; a page message submitted
    after a control envelope is handed to its instance only once that envelope's fence was (held
    meanwhile, with its original deadline). The reader (:class:`FenceGate`, between the shards'
    readers and the router) holds instance i at fence F until control F was applied, and holds
    control N until every other instance reached fence N: every page message published before control N (on any instance) is
    delivered before it, every one published after its publish returned is delivered after it.
    A fence never reaches the router.

A dead publisher
    A publisher that died after instance 0 accepted N but before its fences were written must not
    block the cluster: after ``fence_timeout`` seconds (default ``publish_timeout`` + 1 s) without
    fence N from instance i, a reader writes fence N there itself (any process may; duplicates are
    no-ops). If it still has not arrived after another ``fence_timeout`` and instance i is
    unreachable — or a fence's control never comes (instance 0 read to its end without it: it
    restarted empty; or unreachable) — the gate goes on without it: a *gap* (``fence_gaps``,
    logged once with its numbers, ``page_discard`` for every page subscription through
    ``on_gap``, as for a gap of a stream).

Futures
    As with one instance: a publish completes once it came back through this process's reader and
    was handed to the router — for an envelope the gate held, when the gate hands it on — or at its
    deadline once accepted; it fails with ``BrokerUnavailable`` otherwise, never later than
    ``publish_timeout`` after the call, and a failed one is never applied later (each instance's
    script refuses an envelope past its deadline).
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import uuid
import zlib
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple, Union

from .broker import Broker, BrokerUnavailable
from .envelope import MESSAGE, Envelope
from .history import HistoryStore
from .redaction import redact_url
from .redis_broker import _PREFIX, RedisBroker, _disconnect, _Pending, route_of

log = logging.getLogger("tornado_rt.redis")

#: The kind of a fence envelope (``type``: the control entry's sequence number, decimal).
FENCE = "fence"
#: Seconds between two looks of the gate's watch (timeouts, deadlines of held publishes). It
#: only looks while the gate holds something.
WATCH_INTERVAL = 0.1


def shard_of(group: str, shards: int) -> int:
    """The instance (0 .. ``shards`` - 1) that page group ``group`` lives on: ``crc32(group) mod
    shards``. A pure function of the group and K: every process and publisher computes the same,
    as long as they list the same URLs in the same order."""
    return zlib.crc32(group.encode()) % shards


def fence_envelope(n: int) -> Envelope:
    """The fence of control entry ``n`` (published on every instance but the first)."""
    return Envelope(FENCE, type="%d" % n)


# --- the read side: a pure gate ----------------------------------------------------------------------

_PAGE, _CONTROL, _FENCE = 0, 1, 2


def _complete(waiter: Any) -> None:
    """Complete the publish a held envelope belongs to (a ``_Pending``: its future or batch)."""
    future = waiter.future
    if not future.done():
        future.set_result(None)


class FenceGate:
    """Between the K shards' readers and the router (sans I/O: no sockets, no clock of its own).

    Shard 0 hands it page messages (:meth:`page` with its read position) and control envelopes
    (:meth:`control` with their sequence number N); shard i > 0 hands it page messages and fences
    (:meth:`fence`). A shard at fence F records ``reached[i] = max(reached[i], F)`` and holds its
    later envelopes until control F was applied (a fence <= what was applied is a no-op, so
    fences may come duplicated or out of order). Control N (and everything after it from shard 0)
    is held until ``reached[i] >= N`` for every i > 0. ``applied``: shard 0's read position up to
    which everything was handed to ``deliver``.

    :meth:`page`, :meth:`control` return None when the envelope was handed on at once, else what
    takes the publish it belongs to (``RedisBroker._hand`` passes it), completed by ``complete``
    when it is handed on. Until :meth:`open` everything passes at once (a server replays the
    control stream from its directory snapshot before it serves anyone: fences written before
    the other shards' readers started are never read). :meth:`overdue` says which fences to write
    and which to give up on (a gap); the caller calls it while :meth:`holding`."""

    def __init__(self, shards: int, deliver: Callable[[Envelope], Any],
                 complete: Callable[[Any], None] = _complete):
        if shards < 2:
            raise ValueError("a FenceGate needs at least 2 shards")
        self.shards = shards
        self.deliver = deliver
        self.complete = complete
        self.is_open = False
        self.applied = 0
        #: The highest fence each shard reached (index 0 unused).
        self.reached = [0] * shards
        self._queues: List[Deque[List[Any]]] = [collections.deque() for _ in range(shards)]
        self._hint = 0  # shard 0 read up to here: applied once its queue is empty
        self._heads: Dict[int, Tuple[Tuple[int, int], float]] = {}  # shard -> (blocked head, since)
        self._asked: Set[Tuple[int, int]] = set()  # fences (shard, n) overdue() asked to write
        #: Control envelopes that waited for a fence; fences overdue() asked to write; gaps.
        self.waited = 0
        self.timeouts = 0
        self.gaps = 0

    # --- input --------------------------------------------------------------------------------------
    def open(self, applied: int) -> None:
        """From now on order is kept; shard 0 has read (and handed on) up to ``applied``."""
        self.is_open = True
        self.advance(applied)

    def advance(self, position: int) -> None:
        """Shard 0 read up to ``position`` (also entries that delivered nothing: a duplicate, a
        malformed one): once its held envelopes are handed on, everything up to it is applied."""
        if self._queues[0]:
            if position > self._hint:
                self._hint = position
        elif position > self.applied:
            self.applied = position
            self._pump()

    def page(self, shard: int, envelope: Envelope, position: int = 0) -> Optional[Callable[[Any], None]]:
        """A page message from ``shard`` (``position``: shard 0's read position, else 0)."""
        queue = self._queues[shard]
        if queue:
            waiters: List[Any] = []
            queue.append([_PAGE, position, envelope, waiters])
            return waiters.append
        self._hand(envelope)
        if position > self.applied:
            self.applied = position
            if self.holding():
                self._pump()
        return None

    def control(self, envelope: Envelope, n: int) -> Optional[Callable[[Any], None]]:
        """Control entry ``n`` of shard 0."""
        queue = self._queues[0]
        if not queue:
            if n - 1 > self.applied:  # shard 0 read everything before it
                self.applied = n - 1
                self._pump()  # shards held at fences below n go on (and may reach n)
            if self._passes(n):
                self._hand(envelope)
                if n > self.applied:
                    self.applied = n
                self._pump()
                return None
        self.waited += 1
        waiters: List[Any] = []
        queue.append([_CONTROL, n, envelope, waiters])
        return waiters.append

    def fence(self, shard: int, n: int) -> None:
        """Fence ``n`` read from ``shard`` (> 0)."""
        if shard <= 0:
            return
        queue = self._queues[shard]
        if queue:
            queue.append([_FENCE, n, None, None])
            return
        if n > self.reached[shard]:
            self.reached[shard] = n
        if self.is_open and n > self.applied:
            queue.append([_FENCE, n, None, None])
        self._pump()

    # --- state ----------------------------------------------------------------------------------------
    def holding(self) -> bool:
        """Whether any envelope or fence is held."""
        return any(self._queues)

    def held(self) -> int:
        return sum(len(q) for q in self._queues)

    def waiters(self) -> List[Any]:
        """The publishes of the envelopes held (to complete at their deadline: accepted)."""
        return [w for q in self._queues for item in q if item[3] for w in item[3]]

    def _passes(self, n: int) -> bool:
        return not self.is_open or min(self.reached[1:]) >= n

    def _hand(self, envelope: Envelope) -> None:
        try:
            self.deliver(envelope)
        except Exception:
            log.exception("delivery of %r failed", envelope)

    def _release(self, item: List[Any]) -> None:
        self._hand(item[2])
        for waiter in item[3]:
            self.complete(waiter)

    def _pump(self) -> None:
        """Hand on whatever may go now, until nothing moves."""
        queues, reached = self._queues, self.reached
        moved = True
        while moved:
            moved = False
            first = queues[0]
            while first:
                item = first[0]
                n = item[1]
                if item[0] == _CONTROL:
                    if n - 1 > self.applied:
                        self.applied = n - 1
                        moved = True
                    if not self._passes(n):
                        break
                first.popleft()
                self._release(item)
                if n > self.applied:
                    self.applied = n
                moved = True
            if not first and self._hint > self.applied:
                self.applied = self._hint
                moved = True
            for i in range(1, self.shards):
                queue = queues[i]
                while queue:
                    item = queue[0]
                    if item[0] == _FENCE:
                        n = item[1]
                        if n > reached[i]:
                            reached[i] = n
                            moved = True
                        if self.is_open and n > self.applied:
                            break
                        queue.popleft()
                        continue
                    queue.popleft()
                    self._release(item)

    # --- timeouts ------------------------------------------------------------------------------------
    def _waited(self, shard: int, head: Tuple[int, int], now: float) -> float:
        seen = self._heads.get(shard)
        if seen is None or seen[0] != head:
            self._heads[shard] = (head, now)
            return 0.0
        return now - seen[1]

    def overdue(self, now: float, write_after: float, give_up_after: float,
                stuck: Callable[[int], bool] = lambda shard: True,
                ) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
        """``(writes, gaps)``: the fences ``(shard, n)`` to write now because shard 0's control n
        has waited ``write_after`` seconds for them (once each: any process may write a fence,
        duplicates are no-ops), and the ``(shard, n)`` given up on after ``give_up_after``: shard
        i's missing fence n (counted as reached), or shard i's fence n whose control never came
        while shard 0 held nothing (dropped). Only when ``stuck(shard)`` says the shard the
        missing piece would come from (i, or 0 for a control) cannot deliver it (unreachable; for
        shard 0 also: it read to the end of its stream): a reader that is merely behind will
        bring it. Each gap is counted (``gaps``); the caller tells the clients (page_discard),
        then calls :meth:`resume`. A wait is measured from the first call that saw it."""
        writes: List[Tuple[int, int]] = []
        gaps: List[Tuple[int, int]] = []
        if not self.is_open:
            return writes, gaps
        first = self._queues[0]
        if first and first[0][0] == _CONTROL and not self._passes(first[0][1]):
            n = first[0][1]
            waited = self._waited(0, (_CONTROL, n), now)
            for i in range(1, self.shards):
                if self.reached[i] >= n:
                    continue
                if waited >= give_up_after and stuck(i):
                    self.reached[i] = n
                    self.gaps += 1
                    gaps.append((i, n))
                elif waited >= write_after and (i, n) not in self._asked:
                    if len(self._asked) > 10_000:
                        self._asked.clear()
                    self._asked.add((i, n))
                    self.timeouts += 1
                    writes.append((i, n))
        else:
            self._heads.pop(0, None)
        shard0_waits = bool(first) and first[0][0] == _CONTROL
        for i in range(1, self.shards):
            queue = self._queues[i]
            if queue and queue[0][0] == _FENCE and queue[0][1] > self.applied:
                n = queue[0][1]
                waited = self._waited(i, (_FENCE, n), now)
                # While shard 0 holds a control, its own wait decides (it may be waiting for this
                # very shard's next fence): no second gap for one cause.
                if waited >= give_up_after and not shard0_waits and stuck(0):
                    queue.popleft()
                    self.gaps += 1
                    gaps.append((i, n))
            else:
                self._heads.pop(i, None)
        return writes, gaps

    def resume(self) -> None:
        """Hand on what may go after :meth:`overdue` gave up on something (called once the
        clients were told of the gaps: their page_discard comes before what follows)."""
        self._pump()


# --- the history of the recovery extension, per shard -------------------------------------------------

class PartitionedHistory(HistoryStore):
    """The recovery extension's store over the shards: a page group's positions and history live
    on the instance of the group (:func:`shard_of`), like its messages."""

    def __init__(self, stores: Sequence[Any]):
        self.stores = list(stores)

    def _of(self, group: str) -> Any:
        return self.stores[shard_of(group, len(self.stores))]

    def record(self, group: str, envelope: Any) -> Any:
        return envelope.position  # assigned by the group's instance's publish script

    def append(self, group: str, data: str, exclude: Optional[list]) -> Any:
        return None  # never called: the broker records page messages in Redis

    def forget_all(self) -> None:
        for store in self.stores:
            store.forget_all()

    def position(self, group: str) -> Any:
        return self._of(group).position(group)

    def since(self, group: str, epoch: Any, offset: Any) -> Any:
        return self._of(group).since(group, epoch, offset)

    async def start(self) -> None:
        for store in self.stores:
            await store.start()

    async def close(self) -> None:
        await asyncio.gather(*(store.close() for store in self.stores), return_exceptions=True)


# --- the composite broker ---------------------------------------------------------------------------

class PartitionMismatch(ValueError):
    """An instance says it is another partition (other URLs, another order, another K)."""


_WAIT, _PROBING, _HANDED, _ACCEPTED, _FAILED = range(5)


class _Control:
    """A control envelope of this process on its way: waiting its turn, probing (the page messages
    submitted before it must be answered by their instances first), handed to instance 0,
    accepted there as entry ``n`` (its fences go out once what came before it was handed over),
    or failed. ``future``: what the caller awaits (instance 0's, or one chained to it)."""

    __slots__ = ("envelope", "n", "deadline", "state", "future", "probes")

    def __init__(self, envelope: Envelope, deadline: float):
        self.envelope = envelope
        self.n = 0
        self.deadline = deadline
        self.state = _WAIT
        self.future: Optional["asyncio.Future[None]"] = None
        self.probes = 0


class _Held:
    """Page messages for instance ``shard`` submitted after a control envelope they must follow:
    handed over (with their original deadline) once they may."""

    __slots__ = ("shard", "envelopes", "deadline", "future")

    def __init__(self, shard: int, envelopes: List[Envelope], deadline: float, future: "asyncio.Future[None]"):
        self.shard = shard
        self.envelopes = envelopes
        self.deadline = deadline
        self.future = future


def _fail(future: "asyncio.Future[None]", error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # marked retrieved: a caller may drop it


def _retrieved(future: "asyncio.Future[Any]") -> None:
    if not future.cancelled():
        future.exception()


def _chain(inner: "asyncio.Future[None]", outer: "asyncio.Future[None]") -> None:
    def copy(done: "asyncio.Future[None]") -> None:
        if outer.done():
            return
        if done.cancelled():
            outer.cancel()
        elif done.exception() is not None:
            outer.set_exception(done.exception())  # type: ignore[arg-type]
            outer.exception()
        else:
            outer.set_result(None)
    inner.add_done_callback(copy)


def _join(loop: asyncio.AbstractEventLoop, parts: List["asyncio.Future[None]"]) -> "asyncio.Future[None]":
    """One future for several: done when all are, with the first error among them."""
    if len(parts) == 1:
        return parts[0]
    joined: "asyncio.Future[None]" = loop.create_future()
    if not parts:
        joined.set_result(None)
        return joined
    left = [len(parts)]
    errors: List[BaseException] = []

    def one(done: "asyncio.Future[None]") -> None:
        if done.cancelled():
            errors.append(asyncio.CancelledError())
        elif done.exception() is not None:
            errors.append(done.exception())  # type: ignore[arg-type]
        left[0] -= 1
        if left[0] == 0 and not joined.done():
            if errors:
                joined.set_exception(errors[0])
                joined.exception()
            else:
                joined.set_result(None)
    for part in parts:
        part.add_done_callback(one)
    return joined


class PartitionedRedisBroker(Broker):
    """Page groups over K >= 2 Redis instances (see the module docstring).

    ``urls``: the instances, in the same order on every process and publisher (instance 0 holds
    the control stream, the directory snapshot and presence). ``channel_prefix`` and the other
    options: as for :class:`~tornado_rt.redis_broker.RedisBroker`, the same for every instance
    (``share_directory`` applies to instance 0). ``fence_timeout``: seconds a reader waits for a
    fence before writing it itself (default ``publish_timeout`` + 1); it gives up on it (a gap)
    after as long again."""

    kind = "redis"
    ROUTING_METRICS = {
        **RedisBroker.ROUTING_METRICS,
        "partitions": ("gauge", "Redis instances the page groups are partitioned over"),
        "fences_sent": ("counter", "Fences this process appended to the other Redis instances after its "
                                   "control envelopes"),
        "fences_waited": ("counter", "Control envelopes this process held until every Redis instance "
                                     "reached their fence"),
        "fence_timeouts": ("counter", "Fences this process wrote itself because one did not arrive in time "
                                      "(its publisher died, or was slow)"),
        "fence_gaps": ("counter", "Fences given up on (an instance unreachable, or a control envelope lost): "
                                  "each sends page_discard for every page subscription"),
    }

    def __init__(self, urls: Sequence[str], channel_prefix: str = _PREFIX, *,
                 fence_timeout: Optional[float] = None, **options: Any):
        urls = [url.strip() for url in urls] if not isinstance(urls, str) else [u.strip() for u in urls.split(",")]
        if len(urls) < 2:
            raise ValueError("partitioning needs at least 2 Redis URLs (for one, use RedisBroker)")
        if len(set(urls)) != len(urls):
            raise ValueError("the same Redis URL is listed twice: each instance holds one partition")
        share = bool(options.pop("share_directory", False))
        origin = uuid.uuid4().hex[:16]  # one process id on every instance: the same inbox names
        self.shards = [RedisBroker(url, channel_prefix, share_directory=share and i == 0, origin=origin, **options)
                       for i, url in enumerate(urls)]
        self.urls = urls
        self.count = len(urls)
        self.channel_prefix = channel_prefix
        self.origin = origin
        self.publish_timeout = self.shards[0].publish_timeout
        if fence_timeout is not None and not fence_timeout > 0:
            raise ValueError("fence_timeout must be positive")
        self.fence_timeout = self.publish_timeout + 1.0 if fence_timeout is None else fence_timeout
        self.registry: Any = None
        self.gate = FenceGate(self.count, _nowhere)
        self.shards[0].attach(self._from_control_shard)
        for i in range(1, self.count):
            self.shards[i].attach(self._from_shard(i))
        self.shards[0].on_accepted = self._accepted
        for shard in self.shards[1:]:
            shard.on_accepted = self._probe_accepted
        self._queue: Deque[Union[_Control, _Held]] = collections.deque()
        self._controls: Dict[int, _Control] = {}  # id(envelope) -> its control, until accepted or failed
        self._probes: Dict[int, Tuple[Envelope, _Control]] = {}  # id(probe) -> (probe, its control)
        self._unhanded = 0  # control envelopes not handed to instance 0 yet
        # Instances that were handed page messages since _start last found all of them answered.
        self._dirty = [False] * self.count
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._watch: Optional[asyncio.Task] = None
        #: Fences appended after this process's control envelopes.
        self.fences_sent = 0

    # --- wiring -----------------------------------------------------------------------------------
    def attach(self, deliver: Any) -> None:
        self._deliver = deliver
        self.gate.deliver = deliver

    def configure(self, settings: Any, on_gap: Any = None) -> None:
        super().configure(settings, on_gap)
        for shard in self.shards:
            shard.configure(settings, on_gap)

    def bind_hub(self, hub: Any, router: Any, registry: Any) -> None:
        """Every shard routes the page groups it holds (``hub.register`` / ``hub.on_empty``
        dispatch by :func:`shard_of`)."""
        self.registry = registry
        for shard in self.shards:
            shard.bind_hub(hub, router, registry)
        hub.register = self.register
        hub.on_empty = self.unregister

    def register(self, group: str) -> Any:
        return self.shards[shard_of(group, self.count)].register(group)

    def unregister(self, group: str) -> None:
        self.shards[shard_of(group, self.count)].unregister(group)

    def share_directory(self, directory: Any, router: Any) -> None:
        """Instance 0 keeps the directory snapshot; it is taken only while the gate holds nothing
        of instance 0 (else its read position would be ahead of the directory applied)."""
        self.shards[0].share_directory(directory, _GatedRouter(router, self.gate))

    def history_store(self, size: int, ttl: float, live: Any = tuple) -> Any:
        count = self.count

        def live_on(i: int) -> Callable[[], List[str]]:
            return lambda: [group for group in live() if shard_of(group, count) == i]
        return PartitionedHistory([shard.history_store(size, ttl, live_on(i)) for i, shard in enumerate(self.shards)])

    def presence_store(self, ttl: float) -> Any:
        return self.shards[0].presence_store(ttl)

    # --- state --------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether this process reads every instance right now."""
        return all(shard.connected for shard in self.shards)

    @property
    def url(self) -> str:
        """The instances' URLs, redacted, comma-separated."""
        return ",".join(redact_url(url) for url in self.urls)

    @property
    def position(self) -> int:
        return self.shards[0].position

    def _sum(name: str) -> Any:  # type: ignore[misc]  # noqa: N805 - a property factory
        return property(lambda self: sum(getattr(shard, name) for shard in self.shards))

    gaps = _sum("gaps")
    lost = _sum("lost")
    resets = _sum("resets")
    subscriptions = _sum("subscriptions")
    snapshots_written = _sum("snapshots_written")
    snapshot_advances = _sum("snapshot_advances")
    snapshot_failures = _sum("snapshot_failures")
    duplicates = _sum("duplicates")
    del _sum

    def routing_stats(self) -> Dict[str, int]:
        totals: Dict[str, int] = {}
        for shard in self.shards:
            for name, value in shard.routing_stats().items():
                totals[name] = totals.get(name, 0) + value
        gate = self.gate
        totals.update(partitions=self.count, fences_sent=self.fences_sent, fences_waited=gate.waited,
                      fence_timeouts=gate.timeouts, fence_gaps=gate.gaps)
        return totals

    # --- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Check that every instance is the partition it is listed as, start the shards (instance
        0 last: it replays the control stream from the directory snapshot), then keep order."""
        if self._watch is not None:
            return
        self._loop = asyncio.get_running_loop()
        await self._check_partitions()
        started: List[RedisBroker] = []
        try:
            for shard in self.shards[1:] + self.shards[:1]:
                await shard.start()
                started.append(shard)
        except BaseException:
            await asyncio.gather(*(shard.close() for shard in started), return_exceptions=True)
            raise
        self.gate.open(self.shards[0].position)
        self._watch = self._loop.create_task(self._watch_forever())
        log.info("page groups partitioned over %d Redis instances (%s); control stream on the first",
                 self.count, self.url)

    async def _check_partitions(self) -> None:
        """``<prefix>:partition`` = ``"<i>/<K>"`` on each instance (set when absent): refuse to
        start when one says another partition (the URLs listed in another order, another K)."""
        mismatches = []
        for i, shard in enumerate(self.shards):
            expected = f"{i}/{self.count}"
            conn: Any = None
            try:
                async with asyncio.timeout(shard.start_timeout):
                    conn = await shard._connect()
                    key = f"{self.channel_prefix}:partition"
                    await conn.send_command("SET", key, expected, "NX", check_health=False)
                    await conn.read_response()
                    await conn.send_command("GET", key, check_health=False)
                    found = await conn.read_response()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise shard._unavailable(f"cannot check its partition ({type(exc).__name__}: {exc})") from None
            finally:
                if conn is not None:
                    await _disconnect(conn)
            found = found.decode() if isinstance(found, bytes) else str(found)
            if found != expected:
                mismatches.append(f"{redact_url(shard.url)} is partition {found} but listed as {expected}")
        if mismatches:
            raise PartitionMismatch(
                "the Redis instances are not the partitions they are listed as (" + "; ".join(mismatches)
                + "): every process and publisher must list the same Redis URLs in the same order (the key "
                f"{self.channel_prefix}:partition on each instance says which it is; delete it only with the "
                "whole cluster stopped and the streams drained)")

    async def close(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        error = BrokerUnavailable(f"Redis broker unavailable ({self.url}): broker closed")
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, _Held):
                _fail(item.future, error)
            elif item.state in (_WAIT, _PROBING) and item.future is not None:
                _fail(item.future, error)
        await asyncio.gather(*(shard.close() for shard in self.shards), return_exceptions=True)
        for waiter in self.gate.waiters():  # accepted: as at their deadline
            _complete(waiter)

    # --- publishing ---------------------------------------------------------------------------------
    # Writer order (docs/redis.md "Fences"): a control envelope goes to instance 0 only once every
    # page message this process handed to another instance before it was answered there (a probe,
    # an empty fence, when some are still unanswered): so any fence >= its entry is behind them in
    # their instance's stream, whoever wrote that fence. Page messages for another instance that
    # come after a control envelope wait until its fences are queued; page messages for instance
    # 0 wait only while a control envelope before them is not handed to instance 0 yet.
    def _not_ready(self, shards: Sequence[RedisBroker]) -> Optional[BrokerUnavailable]:
        for shard in shards:
            if not shard.connected:
                return shard._not_ready()
        return None

    def _direct(self, i: int) -> bool:
        """Whether a page message for instance ``i`` may be handed over at once."""
        return not self._queue if i else self._unhanded == 0

    def publish(self, envelope: Envelope, deadline: Optional[float] = None) -> "asyncio.Future[None]":
        """Queue ``envelope`` on its instance (see the module docstring)."""
        group, plain = route_of(envelope, self.registry)
        if not plain:
            return self._control(envelope, deadline)
        i = shard_of(group, self.count)
        shard = self.shards[i]
        if self._direct(i):
            self._dirty[i] = True
            return shard.publish(envelope, deadline)
        if not shard.connected:
            raise shard._not_ready()
        loop = self._loop
        assert loop is not None
        future: "asyncio.Future[None]" = loop.create_future()
        self._queue.append(_Held(i, [envelope], loop.time() + self.publish_timeout if deadline is None else deadline,
                                 future))
        return future

    def _control(self, envelope: Envelope, deadline: Optional[float]) -> "asyncio.Future[None]":
        """A control envelope: on instance 0, fenced on every other once accepted. Refused at once
        unless this process reads every instance (its fences could not be written)."""
        error = self._not_ready(self.shards)
        if error is not None:
            raise error
        loop = self._loop
        assert loop is not None
        control = _Control(envelope, loop.time() + self.publish_timeout if deadline is None else deadline)
        self._queue.append(control)
        self._unhanded += 1
        self._drain()
        if control.future is None:
            control.future = loop.create_future()
        return control.future

    def publish_batch(self, envelopes: Sequence[Envelope],
                      deadline: Optional[float] = None) -> "asyncio.Future[None]":
        """:meth:`publish` of each, in order, with one future for all of them (one batch per
        instance between control envelopes)."""
        loop = self._loop
        if loop is None:
            raise self.shards[0]._not_ready()
        targets: List[int] = []
        for envelope in envelopes:
            group, plain = route_of(envelope, self.registry)
            targets.append(shard_of(group, self.count) if plain else -1)
        needed = self.shards if -1 in targets else [self.shards[i] for i in set(targets)]
        error = self._not_ready(needed)
        if error is not None:
            raise error
        if deadline is None:
            deadline = loop.time() + self.publish_timeout
        parts: List["asyncio.Future[None]"] = []
        runs: Dict[int, List[Envelope]] = {}
        mine: Set[int] = set()  # the _Held of this batch (extended while they are the queue's tail)
        for envelope, i in zip(envelopes, targets):
            if i < 0:
                for shard, run in runs.items():  # handed over first: the control waits for their answers
                    parts.append(self._hand_over(shard, run, deadline))
                runs = {}
                parts.append(self._control(envelope, deadline))
            elif self._direct(i):
                runs.setdefault(i, []).append(envelope)
            else:
                tail = self._queue[-1]
                if isinstance(tail, _Held) and tail.shard == i and id(tail) in mine:
                    tail.envelopes.append(envelope)
                else:
                    held = _Held(i, [envelope], deadline, loop.create_future())
                    mine.add(id(held))
                    self._queue.append(held)
                    parts.append(held.future)
        for i, run in runs.items():
            parts.append(self._hand_over(i, run, deadline))
        return _join(loop, parts)

    def _hand_over(self, i: int, envelopes: List[Envelope], deadline: float) -> "asyncio.Future[None]":
        shard = self.shards[i]
        self._dirty[i] = True
        if len(envelopes) == 1:
            return shard.publish(envelopes[0], deadline)
        return shard.publish_batch(envelopes, deadline)

    def _drain(self) -> None:
        """Move on, in call order: fence what instance 0 accepted, release what waited for those
        fences, hand control envelopes (and the page messages for instance 0 behind them) over."""
        queue = self._queue
        loop = self._loop
        assert loop is not None
        while queue:
            head = queue[0]
            if isinstance(head, _Held):  # every control envelope before it is fenced (or failed)
                queue.popleft()
                self._release(head)
                continue
            if head.state == _ACCEPTED:
                queue.popleft()
                # The fence's deadline: the control's (the publishes held behind it have later
                # ones), unless that has passed (accepted at the last moment).
                deadline = max(head.deadline, loop.time() + 0.1)
                for i in range(1, self.count):
                    self.fences_sent += 1
                    self._write_fence(i, head.n, deadline)
                continue
            if head.state == _FAILED:
                queue.popleft()
                continue
            break
        blocked = False  # a page message for another instance waits before what follows
        for item in list(queue):
            if isinstance(item, _Held):
                if item.shard:
                    blocked = True  # it waits for fences; a control envelope after it, for its answer
                    continue
                queue.remove(item)  # behind the control envelopes handed over before it
                self._release(item)
            elif item.state == _WAIT:
                if blocked or not self._start(item):
                    return
            elif item.state == _PROBING:
                return

    def _start(self, control: _Control) -> bool:
        """Hand ``control`` to instance 0 (True), or first probe the instances where page messages
        of this process are still unanswered (False: it goes once the probes are answered)."""
        unanswered = []
        for i in range(1, self.count):
            if self._dirty[i]:
                shard = self.shards[i]
                if any(not entry.accepted for entry in shard._pending.values()):
                    unanswered.append(shard)
                else:
                    self._dirty[i] = False
        if not unanswered:
            self._hand_control(control)
            return True
        control.state = _PROBING
        for shard in unanswered:
            probe = fence_envelope(0)  # a fence that is always a no-op for readers
            try:
                future = shard.publish(probe, control.deadline)
            except BrokerUnavailable:
                continue  # not reading it: nothing of this process is sent there meanwhile
            control.probes += 1
            self._probes[id(probe)] = (probe, control)
            future.add_done_callback(functools.partial(self._probe_done, probe))
        if not control.probes:
            self._hand_control(control)
            return True
        return False

    def _probe_done(self, probe: Envelope, future: "asyncio.Future[None]") -> None:
        if not future.cancelled():
            future.exception()  # a failed probe is an answer too (marked retrieved)
        self._probed(probe)

    def _probed(self, probe: Envelope) -> None:
        """A probe was answered (accepted, or failed: then nothing before it can land later)."""
        taken = self._probes.pop(id(probe), None)
        if taken is None or taken[0] is not probe:
            return
        control = taken[1]
        control.probes -= 1
        if control.probes == 0 and control.state == _PROBING:
            self._hand_control(control)
            self._drain()

    def _hand_control(self, control: _Control) -> None:
        loop = self._loop
        assert loop is not None
        self._unhanded -= 1
        error: Optional[BrokerUnavailable] = None
        if control.deadline <= loop.time():
            error = self.shards[0]._unavailable(
                f"not sent within {self.publish_timeout:g} s: it waited for page messages sent before it "
                "(the publish will not be applied later)")
        else:
            try:
                inner = self.shards[0].publish(control.envelope, control.deadline)
            except BrokerUnavailable as exc:
                error = exc
        if error is not None:
            control.state = _FAILED
            if control.future is None:
                control.future = loop.create_future()
            _fail(control.future, error)
            return
        control.state = _HANDED
        self._controls[id(control.envelope)] = control
        if control.future is None:
            control.future = inner
        else:
            _chain(inner, control.future)
        inner.add_done_callback(lambda done: self._settled(control))

    def _accepted(self, n: int, entry: _Pending) -> None:
        """Instance 0's writer: a publish of this process became control entry ``n``."""
        control = self._controls.pop(id(entry.envelope), None)
        if control is None or control.envelope is not entry.envelope:
            return  # a plain page message on the control stream (routing off): no fence needed
        control.n = n
        control.state = _ACCEPTED
        try:  # never into instance 0's writer: it would take it for a failed publish
            self._drain()
        except Exception:
            log.exception("handing over after control entry %d failed", n)

    def _probe_accepted(self, n: int, entry: _Pending) -> None:
        """Another instance's writer: a probe was accepted (or another control entry: ignored)."""
        if id(entry.envelope) in self._probes:
            try:
                self._probed(entry.envelope)
            except Exception:
                log.exception("handing over after a probe failed")

    def _settled(self, control: _Control) -> None:
        if control.state == _HANDED:  # failed (or cancelled) before Redis accepted it: nothing to fence
            self._controls.pop(id(control.envelope), None)
            control.state = _FAILED
            self._drain()

    def _release(self, held: _Held) -> None:
        loop = self._loop
        assert loop is not None
        if held.future.done():
            return
        if held.deadline <= loop.time():
            _fail(held.future, self.shards[held.shard]._unavailable(
                f"not sent within {self.publish_timeout:g} s: it waited behind a control envelope's fences "
                "(the publish will not be applied later)"))
            return
        try:
            inner = self._hand_over(held.shard, held.envelopes, held.deadline)
        except BrokerUnavailable as exc:
            _fail(held.future, exc)
            return
        _chain(inner, held.future)

    def _write_fence(self, i: int, n: int, deadline: Optional[float] = None) -> None:
        try:
            future = self.shards[i].publish(fence_envelope(n), deadline)
        except BrokerUnavailable as exc:
            log.info("fence %d not written to Redis %s: %s", n, redact_url(self.urls[i]), exc)
            return
        future.add_done_callback(_retrieved)

    # --- reading ----------------------------------------------------------------------------------
    def _from_control_shard(self, envelope: Envelope) -> Any:
        """What instance 0's reader hands on: page messages, and control entries (its position
        is their sequence number while it hands them)."""
        if envelope.kind == MESSAGE:
            audience = envelope.audience
            if audience and audience[0] == "page" and route_of(envelope, self.registry)[1]:
                hold = self.gate.page(0, envelope, self.shards[0].position)
                return None if hold is None else self._held(hold)
        elif envelope.kind == FENCE:
            return None
        return self._held(self.gate.control(envelope, self.shards[0].position))

    def _held(self, hold: Optional[Callable[[Any], None]]) -> Optional[Callable[[Any], None]]:
        """What ``RedisBroker._hand`` gets for an envelope the gate holds: the gate completes its
        publish when it hands the envelope on, a timer at its deadline if that comes first
        (accepted: delivery follows), so a publish never waits longer than ``publish_timeout``."""
        if hold is None:
            return None
        loop = self._loop

        def take(entry: Any) -> None:
            hold(entry)
            if loop is not None:
                loop.call_at(entry.deadline, _complete, entry)
        return take

    def _from_shard(self, i: int) -> Callable[[Envelope], Any]:
        gate = self.gate

        def deliver(envelope: Envelope) -> Any:
            if envelope.kind == FENCE:
                try:
                    n = int(envelope.type or "")
                except ValueError:
                    log.error("ignored a malformed fence %r on Redis %s", envelope.type, redact_url(self.urls[i]))
                    return None
                gate.fence(i, n)
                return None
            hold = gate.page(i, envelope)
            return None if hold is None else self._held(hold)
        return deliver

    async def _watch_forever(self) -> None:
        """While the gate holds something: let it know how far instance 0 was read, write overdue
        fences, give up on lost ones (a gap); complete held publishes past their deadline (each
        has its own timer too: see :meth:`_held`)."""
        gate = self.gate
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if gate.holding():
                try:
                    self._look()
                except Exception:  # the watch must survive anything
                    log.exception("the fence gate's watch failed")

    def _look(self) -> None:
        """One look of the watch (see :meth:`_watch_forever`)."""
        loop = self._loop
        assert loop is not None
        gate = self.gate
        gate.advance(self.shards[0].position)
        now = loop.time()
        for waiter in gate.waiters():
            if waiter.deadline <= now:
                _complete(waiter)
        writes, gaps = gate.overdue(now, self.fence_timeout, 2 * self.fence_timeout, self._stuck)
        for i, n in writes:
            log.warning("fence %d did not arrive from Redis %s within %g s (its publisher died or is slow): "
                        "writing it", n, redact_url(self.urls[i]), self.fence_timeout)
            self._write_fence(i, n)
        for i, n in gaps:
            self._fence_gap(i, n)
        if gaps:
            gate.resume()

    def _stuck(self, i: int) -> bool:
        """Whether instance ``i`` cannot bring what the gate waits for: not connected; or, for
        instance 0, its reader read to the end of its stream (the control envelope is not there)."""
        shard = self.shards[i]
        return not shard.connected or (i == 0 and shard._caught_up)

    def _fence_gap(self, i: int, n: int) -> None:
        discarded = 0
        if self.on_gap is not None:
            try:
                discarded = self.on_gap() or 0
            except Exception:
                log.exception("the gap handler failed")
        log.warning("Redis %s: fence %d (of control entry %d) was given up on after %g s (the instance was "
                    "unreachable, or the control envelope was lost); order between its page messages and "
                    "the control stream may not hold (fence gap %d); sent page_discard for %d page "
                    "subscriptions so that clients resubscribe and refetch.", redact_url(self.urls[i]), n, n,
                    2 * self.fence_timeout, self.gate.gaps, discarded)


class _GatedRouter:
    """The router as instance 0's directory snapshot writer sees it: busy also while the gate
    holds envelopes of instance 0 (read, so counted in its position, but not applied yet)."""

    def __init__(self, router: Any, gate: FenceGate):
        self._router = router
        self._gate = gate

    @property
    def busy(self) -> bool:
        return bool(self._router.busy) or bool(self._gate._queues[0])

    async def wait_idle(self) -> None:
        while True:
            if self._router.busy:
                await self._router.wait_idle()
            elif self._gate._queues[0]:
                await asyncio.sleep(WATCH_INTERVAL)  # the gate has no event; its holds are short
            else:
                return


def _nowhere(envelope: Envelope) -> None:
    return None
