"""Cluster-wide recovery over Redis (the recovery extension with the Redis broker; issue 14 §2).

The Redis broker's publish script assigns the position of every message to a page group that
keeps a history (see ``redis_broker.PUBLISH_SCRIPT``): hash ``<prefix>:pos:<group>`` holds the
group's epoch ``e`` and offset ``o``; stream ``<prefix>:hist:<group>`` holds its last
``history_size`` messages (fields ``q``: offset, ``t``: Redis time in ms, ``e``: the envelope as
published). The hash is created (a new epoch) when a connection with positions subscribes to the
group on any process, refreshed every third of ``history_ttl`` by each process that has such a
connection on it, and expires ``history_ttl`` seconds after the last message once nobody with
positions is subscribed: pages nobody asked positions for cost one ``HGET`` per message while
some page keeps a history (the key ``<prefix>:hists`` exists), nothing otherwise. Every
process reads the same position with each envelope, so a client may reconnect to any process
with ``since``.

This store answers ``position`` and ``since`` from Redis (one script call each, atomic);
:class:`~tornado_rt.history.Recovery` holds the live messages that reach the connection meanwhile
and releases them after the replay, skipping the offsets the replay covered.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Iterable, List, Optional, Tuple

import ujson

from .history import Entry, HistoryStore, Position

try:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("cluster-wide recovery needs the redis extra: pip install 'tornado-rt[redis]'") from exc

log = logging.getLogger("tornado_rt.redis")

# KEYS[3] is the marker ``<prefix>:hists``: it exists while any page keeps a history (its TTL is
# never shorter than that of any pos key: set here, by the refresher and by the publish script
# whenever they set a pos key's), so the publish script skips the per-envelope HGET of the pos
# key when it is absent (one EXISTS per script call instead).
_NEW_EPOCH = """
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  local t = redis.call('TIME')
  e = t[1] .. '.' .. t[2]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', e, 'o', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
redis.call('SET', KEYS[3], 1, 'NX', 'PX', ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[1], 'GT')
"""

# KEYS: pos, hist, marker. ARGV: ttl ms. Returns {epoch, offset}.
POSITION_SCRIPT = _NEW_EPOCH + """
return {e, redis.call('HGET', KEYS[1], 'o')}
"""

# KEYS: pos, hist, marker. ARGV: ttl ms, epoch, offset. Returns {1 | 0, epoch, offset, then when
# recovered (offset, envelope) pairs of every message after the given offset, oldest first}.
SINCE_SCRIPT = _NEW_EPOCH + """
local o = tonumber(redis.call('HGET', KEYS[1], 'o'))
local n = tonumber(ARGV[3])
if e ~= ARGV[2] or n > o then
  return {0, e, tostring(o)}
end
local out = {1, e, tostring(o)}
if n == o then
  return out
end
local t = redis.call('TIME')
local oldest = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[1])
local found = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', o - n)
local need = o
local kept = {}
for _, entry in ipairs(found) do
  local f = entry[2]
  local q, at, env
  for i = 1, #f, 2 do
    if f[i] == 'q' then q = tonumber(f[i + 1]) elseif f[i] == 't' then at = tonumber(f[i + 1])
    elseif f[i] == 'e' then env = f[i + 1] end
  end
  if q ~= need or at < oldest then
    return {0, e, tostring(o)}
  end
  kept[#kept + 1] = {q, env}
  need = need - 1
end
if need ~= n then
  return {0, e, tostring(o)}
end
for i = #kept, 1, -1 do
  out[#out + 1] = kept[i][1]
  out[#out + 1] = kept[i][2]
end
return out
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisHistory(HistoryStore):
    """Positions and history kept in Redis by the Redis broker (see the module docstring)."""

    def __init__(self, url: str, prefix: str, ttl: float, live: Callable[[], Iterable[str]] = tuple):
        self.redis = Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        self.prefix = f"{prefix}:"
        self.ttl = ttl
        self.ttl_ms = max(1, int(ttl * 1000))
        self.live = live  # the groups with a positioned connection in this process
        self._refresher: Optional[asyncio.Task] = None
        self._stop = asyncio.Event()
        self._position = self.redis.register_script(POSITION_SCRIPT)
        self._since = self.redis.register_script(SINCE_SCRIPT)

    def _keys(self, group: str) -> List[str]:
        return [f"{self.prefix}pos:{group}", f"{self.prefix}hist:{group}", f"{self.prefix}hists"]

    def record(self, group: str, envelope: Any) -> Optional[Position]:
        return envelope.position  # assigned by the publish script, read with the envelope

    def append(self, group: str, data: str, exclude: Optional[list]) -> Optional[Position]:
        return None  # never called: the broker records page messages in Redis

    def forget_all(self) -> None:
        """A gap of this process's reading: the history in Redis is intact, nothing to forget."""

    def position(self, group: str) -> Any:
        return self._position_async(group)

    async def _position_async(self, group: str) -> Position:
        epoch, offset = await self._position(keys=self._keys(group), args=[self.ttl_ms])
        return _text(epoch), int(offset)

    def since(self, group: str, epoch: Any, offset: Any) -> Any:
        return self._since_async(group, epoch, offset)

    async def _since_async(self, group: str, epoch: Any, offset: Any) -> Tuple[bool, Position, List[Entry]]:
        if not isinstance(epoch, str) or type(offset) is not int or offset < 0:
            current = await self._position_async(group)
            return False, current, []
        reply = await self._since(keys=self._keys(group), args=[self.ttl_ms, epoch, offset])
        recovered, current = bool(int(reply[0])), (_text(reply[1]), int(reply[2]))
        if not recovered:
            return False, current, []
        entries: List[Entry] = []
        for i in range(3, len(reply), 2):
            payload = reply[i + 1]
            cut = payload.find(b"\n")
            header = ujson.loads(payload[:cut])
            entries.append((int(reply[i]), 0.0, payload[cut + 1:].decode(), header.get("x")))
        return True, (epoch, offset), entries

    async def start(self) -> None:
        self._stop = asyncio.Event()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        """Keep the positions of the groups watched here from expiring on a quiet page."""
        stop = self._stop
        while not stop.is_set():
            groups = list(self.live())
            if groups:
                try:
                    pipe = self.redis.pipeline(transaction=False)
                    for group in groups:
                        pipe.pexpire(f"{self.prefix}pos:{group}", self.ttl_ms)
                    # the marker outlives every pos key (see _NEW_EPOCH)
                    pipe.set(f"{self.prefix}hists", 1, nx=True, px=self.ttl_ms)
                    pipe.pexpire(f"{self.prefix}hists", self.ttl_ms, gt=True)
                    await pipe.execute()
                except (RedisError, OSError) as exc:
                    log.warning("recovery: refreshing positions in Redis failed: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), self.ttl / 3)
            except asyncio.TimeoutError:
                pass

    async def close(self) -> None:
        """Stop refreshing and close the client, within ~3 s. The refresher is asked to stop
        rather than cancelled: a redis-py command cancelled while it connects may never return."""
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            self._stop.set()
            done, _ = await asyncio.wait({refresher}, timeout=2.0)
            if not done:
                refresher.cancel()
        closing = asyncio.ensure_future(self.redis.aclose())
        await asyncio.wait({closing}, timeout=1.0)
