"""Cluster-wide presence over Redis (the presence extension with the Redis broker; issue 14 §8).

Each process keeps its own counts (:class:`~tornado_rt.presence.LocalPresence`) and writes them
through to Redis, so that a ``presence`` answer on any process counts the connections of every
process:

* ``<prefix>:presence:<group>`` is a hash: field ``<process id>|<user id as JSON>`` (``<process
  id>|`` for anonymous connections) -> this process's connections of that user on that page. Each
  change of a local count is written (``HSET``, or ``HDEL`` at zero) at once, in order, on one
  connection; the whole local state is written again on every refresh (after a Redis restart the
  counts come back within one refresh).
* ``<prefix>:presence:alive:<process id>`` exists while the process lives: set with a TTL of
  ``presence_ttl`` seconds and refreshed every third of it. A process that dies without cleaning
  up (SIGKILL) stops refreshing it; once it expired, answers leave that process's users out and
  drop its fields (the read script).
* An answer reads the page's hash with one script (:data:`READ_SCRIPT`) that keeps the fields of
  live processes only; a user on process A is in an answer on process B as soon as A's write
  reached Redis (one round trip after the subscription).

``presence_joined`` / ``presence_left`` are cluster-wide too: when a user's first connection on
this process joins a page (or its last one leaves), the write runs :data:`CHANGE_SCRIPT`, which
counts the user's connections on that page over every live process in the same atomic step; at 1
(joined) or 0 (left) this process publishes a ``presence`` envelope through the broker, and every
process tells its watchers of the page, in the stream's order with the page's messages. (The users
of a killed process leave the answers after the TTL without a ``presence_left``.)
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import ujson

from .presence import LocalPresence, PresenceStore

try:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("cluster-wide presence needs the redis extra: pip install 'tornado-rt[redis]'") from exc

log = logging.getLogger("tornado_rt.redis")

# KEYS[1]: the page's hash. ARGV[1]: the prefix of the alive keys; ARGV[2]: the page's "watched"
# key, ARGV[3]: its TTL in ms, ARGV[4]: a fresh random epoch (used if the key is new). Marks the
# page watched (from now on its joins and leaves are announced), then returns
# {fields and values of live processes (flat), epoch, version}, after deleting the fields of
# processes whose alive key expired. One atomic step: a change before it is in this answer (its
# event has a version <= the one returned), a change after it is announced with a greater version
# (or another epoch, when the watched key expired or Redis lost it in between).
#
# The watched key is a hash: ``epoch`` (random, set when the key is created) and ``n`` (the page's
# presence version, incremented by every announced join / leave, see CHANGE_SCRIPT).
READ_SCRIPT = """
redis.call('HSETNX', ARGV[2], 'epoch', ARGV[4])
redis.call('PEXPIRE', ARGV[2], ARGV[3])
local version = redis.call('HMGET', ARGV[2], 'epoch', 'n')
local fields = redis.call('HGETALL', KEYS[1])
local alive = {}
local out = {}
for i = 1, #fields, 2 do
  local f = fields[i]
  local origin = string.match(f, '^([^|]*)|')
  local live = alive[origin]
  if live == nil then
    live = redis.call('EXISTS', ARGV[1] .. origin) == 1
    alive[origin] = live
  end
  if live then
    out[#out + 1] = f
    out[#out + 1] = fields[i + 1]
  else
    redis.call('HDEL', KEYS[1], f)
  end
end
return {out, version[1], version[2] or '0'}
"""


# KEYS[1]: the page's hash. ARGV: alive key prefix, this field, its count (0: delete), the user's
# field suffix ("|<user id>"), the page's "watched" key, the transition ("presence_joined": the
# user's first connection on this process, "presence_left": its last one), a fresh random epoch.
# Returns {-1} when nobody watches the page's presence (nothing to announce: a page whose presence
# nobody asks for costs no envelope), {total} (the user's connections over every live process) when
# there is nothing to announce, and {total, epoch, version} when the event is to be announced: the
# page's presence version is incremented in the same atomic step, so that an answer (READ_SCRIPT)
# that already reflects this change is known by its version to precede the event.
CHANGE_SCRIPT = """
if tonumber(ARGV[3]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
else
  redis.call('HDEL', KEYS[1], ARGV[2])
end
if redis.call('EXISTS', ARGV[5]) == 0 then
  return {-1}
end
local fields = redis.call('HGETALL', KEYS[1])
local total = 0
local suffix = ARGV[4]
for i = 1, #fields, 2 do
  local f = fields[i]
  if string.sub(f, -#suffix) == suffix then
    local origin = string.match(f, '^([^|]*)|')
    if string.sub(f, #origin + 1) == suffix and redis.call('EXISTS', ARGV[1] .. origin) == 1 then
      total = total + tonumber(fields[i + 1])
    end
  end
end
if (ARGV[6] == 'presence_joined' and total == 1) or (ARGV[6] == 'presence_left' and total == 0) then
  redis.call('HSETNX', ARGV[5], 'epoch', ARGV[7])
  local n = redis.call('HINCRBY', ARGV[5], 'n', 1)
  return {total, redis.call('HGET', ARGV[5], 'epoch'), n}
end
return {total}
"""


class RedisPresence(PresenceStore):
    """Presence counts shared by the processes of one Redis (see the module docstring)."""

    def __init__(self, url: str, prefix: str, origin: str, ttl: float = 30.0):
        self.local = LocalPresence()
        self.redis = Redis.from_url(url, socket_connect_timeout=1.0,
                                    socket_timeout=2.0)
        self.prefix = f"{prefix}:presence:"
        self.alive_key = f"{self.prefix}alive:{origin}"
        self.origin = origin
        self.ttl = ttl
        self._queue: Optional[asyncio.Queue] = None
        self._tasks: List[asyncio.Task] = []
        self._read = self.redis.register_script(READ_SCRIPT)
        self._change = self.redis.register_script(CHANGE_SCRIPT)
        #: ``announce(kind, group, user_id, version)``: publish a cluster-wide presence event (the
        #: server sends a ``presence`` envelope through the broker); ``version`` is the page's
        #: presence version ``(epoch, n)`` of the event (see :meth:`Presence.event`).
        self.announce: Optional[Callable[[str, str, Hashable, Tuple[str, int]], None]] = None
        #: ``watched()``: the groups with a watcher in this process (kept marked watched in Redis).
        self.watched: Callable[[], Any] = tuple

    # --- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write_forever()), loop.create_task(self._refresh_forever())]

    async def close(self) -> None:
        """Leave Redis (this process's fields and alive key deleted, best effort, at most ~3 s).
        The writer is asked to finish rather than cancelled: a redis-py command cancelled while
        it connects may never return."""
        if not self._tasks:
            return
        writer, refresher = self._tasks
        self._tasks = []
        refresher.cancel()
        assert self._queue is not None
        self._queue.put_nowait(_STOP)
        done, _ = await asyncio.wait({writer}, timeout=3.0)
        if not done:
            writer.cancel()
        closing = asyncio.ensure_future(self.redis.aclose())
        await asyncio.wait({closing}, timeout=1.0)

    # --- the store --------------------------------------------------------------------------------
    def _watched_key(self, group: str) -> str:
        # "watch:", not the "watched:" of earlier versions (a string there, a hash here).
        return f"{self.prefix}watch:{group}"

    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    def _field(self, user_id: Optional[Hashable]) -> str:
        return f"{self.origin}|" if user_id is None else f"{self.origin}|{ujson.dumps(user_id)}"

    def _count(self, group: str, user_id: Optional[Hashable]) -> int:
        if user_id is None:
            return self.local.anonymous.get(group, 0)
        return self.local.users.get(group, {}).get(user_id, 0)

    def _write(self, group: str, user_id: Optional[Hashable], transition: Optional[str] = None) -> None:
        if self._queue is not None:
            self._queue.put_nowait((group, self._field(user_id), self._count(group, user_id),
                                    transition, user_id))

    def join(self, group: str, user_id: Optional[Hashable]) -> bool:
        first = self.local.join(group, user_id)
        self._write(group, user_id, "presence_joined" if first else None)
        return False  # the event is decided cluster-wide (CHANGE_SCRIPT) and comes through the broker

    def leave(self, group: str, user_id: Optional[Hashable]) -> bool:
        last = self.local.leave(group, user_id)
        self._write(group, user_id, "presence_left" if last else None)
        return False

    def snapshot(self, group: str) -> Any:
        """An awaitable of ``([(user_id, connections)], anonymous)`` over every live process."""
        return self._snapshot(group)

    async def _snapshot(self, group: str) -> Tuple[List[Tuple[Hashable, int]], int, Optional[Tuple[str, int]]]:
        try:
            flat, epoch, n = await self._read(keys=[self.prefix + group],
                                              args=[self.prefix + "alive:", self._watched_key(group),
                                                    self._ttl_ms(), _epoch()])
        except (RedisError, OSError) as exc:
            log.warning("presence: Redis unavailable (%s); answering with this process's counts", exc)
            users_here, anonymous_here = self.local.snapshot(group)
            return users_here, anonymous_here, None
        version = (epoch.decode() if isinstance(epoch, bytes) else str(epoch), int(n))
        users: Dict[Hashable, int] = {}
        anonymous = 0
        for i in range(0, len(flat), 2):
            field = flat[i].decode() if isinstance(flat[i], bytes) else flat[i]
            count = int(flat[i + 1])
            user = field.partition("|")[2]
            if count <= 0:
                continue
            if not user:
                anonymous += count
                continue
            user_id = ujson.loads(user)
            users[user_id] = users.get(user_id, 0) + count
        return list(users.items()), anonymous, version

    # --- writing ----------------------------------------------------------------------------------
    def _fields(self) -> Dict[str, Dict[str, int]]:
        """This process's whole state: group -> {field: count}."""
        state: Dict[str, Dict[str, int]] = {}
        for group, users in self.local.users.items():
            state.setdefault(group, {}).update({self._field(u): n for u, n in users.items()})
        for group, n in self.local.anonymous.items():
            state.setdefault(group, {})[self._field(None)] = n
        return state

    async def _write_forever(self) -> None:
        """The one writer: changes in order, and the refreshes (alive key + the whole state,
        computed when written, so it never overtakes a change) in the same sequence."""
        queue = self._queue
        assert queue is not None
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            pipe = self.redis.pipeline(transaction=False)
            stop = _STOP in batch
            checks: List[Tuple[int, str, str, Hashable]] = []  # (index in the pipeline, kind, group, user)
            for item in batch:
                if item is _STOP:
                    continue
                if stop and item is _REFRESH:
                    continue
                if item is _REFRESH:
                    pipe.set(self.alive_key, "1", px=self._ttl_ms())
                    for group in self.watched():
                        pipe.pexpire(self._watched_key(group), self._ttl_ms())
                    for group, fields in self._fields().items():
                        pipe.hset(self.prefix + group, mapping=dict(fields))  # type: ignore[arg-type]
                    continue
                group, field, count, transition, user_id = item
                if transition is not None:  # the user's first / last connection here
                    checks.append((len(pipe.command_stack), transition, group, user_id))
                    await self._change(keys=[self.prefix + group],  # queued on the pipeline, no I/O
                                       args=[self.prefix + "alive:", field, count, "|" + ujson.dumps(user_id),
                                             self._watched_key(group), transition, _epoch()],
                                       client=pipe)
                elif count > 0:
                    pipe.hset(self.prefix + group, field, count)
                else:
                    pipe.hdel(self.prefix + group, field)
            if stop:  # leave at once instead of after the TTL
                for group, fields in self._fields().items():
                    pipe.hdel(self.prefix + group, *fields)
                pipe.delete(self.alive_key)
            try:
                results = await pipe.execute()
            except (RedisError, OSError) as exc:  # the next refresh writes the whole state again
                log.warning("presence: write to Redis failed: %s", exc)
                results = []
            for index, kind, group, user_id in checks:
                if index < len(results) and self.announce is not None:
                    result = results[index]  # {total, epoch, version}: to announce (see CHANGE_SCRIPT)
                    if isinstance(result, list) and len(result) == 3:
                        epoch = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
                        self.announce(kind, group, user_id, (epoch, int(result[2])))
            if stop:
                return

    async def _refresh_forever(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            queue.put_nowait(_REFRESH)
            await asyncio.sleep(self.ttl / 3)


def _epoch() -> str:
    """A fresh random epoch for a page's presence version (used only if its watched key is new:
    a version of another epoch is never compared by number)."""
    return os.urandom(8).hex()


_REFRESH: Any = object()
_STOP: Any = object()
