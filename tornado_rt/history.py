"""Recovery of missed page messages (protocol extension, docs/protocol.md "Extensions").

Every page group has a **stream position**: an ``epoch`` (an opaque string chosen when the group's
history begins, new whenever history may have been lost) and an ``offset`` (grows by one with
every message delivered to the group). A :class:`HistoryStore` keeps the last ``history_size``
messages of a group for at most ``history_ttl`` seconds.

Opt-in and cost:

* A connection opened with ``positions=1`` is indexed in ``Hub.positioned``. Only then does its
  group's history begin (:meth:`HistoryStore.position`): a deployment whose clients never opt in
  keeps no history and pays one dictionary lookup per page message.
* Page messages to such a connection carry ``"position": {"epoch": E, "offset": N}``, built once
  per message by splicing the key into the serialized text (:func:`positioned_frame`); every
  other subscriber of the group still shares the one pre-framed bytes object it got before.
* ``{"page": ..., "since": {"epoch": E, "offset": N}}`` answers ``page_add`` with ``recovered``
  and ``position``, then the missed messages (each with its position), then the live ones; it all
  happens in one call on the IOLoop thread, so nothing is lost, duplicated or reordered at the seam.

The store is an interface: with the Redis broker, :class:`~tornado_rt.redis_history.RedisHistory`
replaces :class:`MemoryHistory`. The Redis publish script assigns the offset of every page message
and keeps the history in Redis, every process frames the position read with the entry, and
``position`` / ``since`` answer from Redis asynchronously: the session waits for the answer before
the connection's next frame, and the live messages that reach the connection meanwhile are held
(:class:`Held`) and released after the replay, minus those the replay covered. In one process a
gap of the broker ends every epoch (``forget_all``); the history in Redis is not affected by one
process's gap.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import time
import uuid
import weakref
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import ujson

from .hub import Hub, text_frame

log = logging.getLogger("tornado_rt.history")

Position = Tuple[str, int]
#: One stored message: (offset, when it was stored, its JSON text, the user ids it excludes or None).
Entry = Tuple[int, float, str, Optional[list]]


def new_epoch() -> str:
    return uuid.uuid4().hex[:16]


def positioned_text(data: str, epoch: str, offset: int) -> str:
    """``data`` (a serialized JSON object) with one more top-level key, ``position``, last.

    The key is spliced into the text, not serialized again. A message that already holds the word
    ``"position"`` is decoded and re-serialized once, so the key is never doubled (a top-level
    ``position`` of the publisher is replaced for positioned connections)."""
    if '"position"' not in data:
        return f'{data[:-1]},"position":{{"epoch":"{epoch}","offset":{offset}}}}}'
    message = ujson.loads(data)
    message["position"] = {"epoch": epoch, "offset": offset}
    return ujson.dumps(message, ensure_ascii=False)


def positioned_frame(data: str, epoch: str, offset: int) -> bytes:
    return text_frame(positioned_text(data, epoch, offset).encode())


class HistoryStore:
    """Where the positions and the bounded history of the page groups live (the interface).
    ``position`` and ``since`` may return an awaitable (a store in Redis)."""

    def record(self, group: str, envelope: Any) -> Optional[Position]:
        """A page message delivered to ``group``: its position (None: the group keeps no
        history)."""
        return self.append(group, envelope.data, envelope.exclude)

    def append(self, group: str, data: str, exclude: Optional[list]) -> Optional[Position]:
        """Record a message delivered to ``group``; its position, or None when the group keeps no
        history (no connection with positions ever subscribed to it, or it expired)."""
        raise NotImplementedError

    def position(self, group: str) -> Position:
        """The group's current position (its history begins now if it had none)."""
        raise NotImplementedError

    def forget_all(self) -> None:
        """Messages may have been lost (e.g. the broker had a gap): end every group's epoch."""
        raise NotImplementedError

    def since(self, group: str, epoch: Any, offset: Any) -> Tuple[bool, Position, List[Entry]]:
        """``(recovered, position, entries)``: whether every message after ``(epoch, offset)`` is
        still held; when it is, ``position`` is ``(epoch, offset)`` and ``entries`` are those
        messages in order; otherwise the group's current position and no entries."""
        raise NotImplementedError


class _Group:
    __slots__ = ("epoch", "offset", "entries", "touched")

    def __init__(self, size: int, now: float):
        self.epoch = new_epoch()
        self.offset = 0
        self.entries: Deque[Entry] = collections.deque(maxlen=size)
        self.touched = now


class MemoryHistory(HistoryStore):
    """The history of one process, in memory (the in-process broker).

    A group's history begins when a connection with positions subscribes to it and ends (its
    epoch is forgotten) once no such connection is subscribed and nothing happened on it for
    ``ttl`` seconds; a restart loses every epoch. ``live(group)``: whether a positioned connection
    is subscribed (the hub's ``positioned`` index)."""

    def __init__(self, size: int, ttl: float, live: Callable[[str], bool] = lambda group: False,
                 clock: Callable[[], float] = time.monotonic):
        self.size = size
        self.ttl = ttl
        self.live = live
        self.clock = clock
        self.groups: Dict[str, _Group] = {}
        self._swept = clock()

    def record(self, group: str, envelope: Any) -> Optional[Position]:
        # On the delivery path of every page message: a group without history (nobody ever
        # subscribed with positions, or it expired) costs one lookup.
        g = self.groups.get(group)
        if g is None:
            return None
        return self._append(g, envelope.data, envelope.exclude)

    def append(self, group: str, data: str, exclude: Optional[list]) -> Optional[Position]:
        g = self.groups.get(group)
        if g is None:
            return None
        return self._append(g, data, exclude)

    def _append(self, g: "_Group", data: str, exclude: Optional[list]) -> Position:
        now = self.clock()
        g.offset += 1
        g.entries.append((g.offset, now, data, exclude))
        g.touched = now
        if now - self._swept > self.ttl:
            self.sweep(now)
        return g.epoch, g.offset

    def position(self, group: str) -> Position:
        g = self._group(group)
        return g.epoch, g.offset

    def since(self, group: str, epoch: Any, offset: Any) -> Tuple[bool, Position, List[Entry]]:
        g = self._group(group)
        current = (g.epoch, g.offset)
        if (epoch != g.epoch or type(offset) is not int or not 0 <= offset <= g.offset):
            return False, current, []
        entries = g.entries
        expired = self.clock() - self.ttl
        while entries and entries[0][1] < expired:
            entries.popleft()
        first = entries[0][0] if entries else g.offset + 1
        if offset + 1 < first:
            return False, current, []
        return True, (epoch, offset), list(entries)[offset + 1 - first:]

    def _group(self, group: str) -> _Group:
        g = self.groups.get(group)
        now = self.clock()
        if g is None:
            g = self.groups[group] = _Group(self.size, now)
        g.touched = now
        return g

    def forget_all(self) -> None:
        self.groups.clear()

    def sweep(self, now: Optional[float] = None) -> None:
        """Forget the groups that nobody with positions watches and that were idle for ``ttl``."""
        now = self.clock() if now is None else now
        self._swept = now
        for group in [name for name, g in self.groups.items()
                      if now - g.touched > self.ttl and not self.live(name)]:
            del self.groups[group]


class Held:
    """A connection whose subscription is being recovered asynchronously: ``frames`` holds the
    live messages until the answer is out; then ``skip`` is the last position the replay covered,
    and live messages up to it (published before the store answered, read by this process only
    now) are dropped: they were replayed already."""

    __slots__ = ("frames", "skip")

    def __init__(self) -> None:
        self.frames: Optional[List[Tuple[Position, bytes]]] = []
        self.skip: Optional[Position] = None

    def take(self, out: list, position: Position, framed: bytes) -> bool:
        """Whether the frame just queued (``out[-1]``) is held or dropped (else: send it)."""
        if self.frames is not None:
            out.pop()
            self.frames.append((position, framed))
            return True
        skip = self.skip
        if skip is not None and position[0] == skip[0] and position[1] <= skip[1]:
            out.pop()
            return True
        self.skip = None
        return False


class Recovery:
    """The server side of the extension: answers a positioned ``page`` request (``page_add``
    with ``position``, and ``recovered`` when the request named ``since``) and replays.

    When the store answers later (Redis), the connection is already subscribed: the live messages
    that reach it meanwhile are held (``holding[group][session]``, filled by the router) and sent
    after the answer and the replay, minus those the replay covered."""

    def __init__(self, hub: Hub, store: HistoryStore):
        self.hub = hub
        self.store = store
        self.holding: Dict[str, Any] = {}  # group -> WeakKeyDictionary(session -> Held)

    def subscribed(self, session: Any, group: str, page: str, params: dict, frame: dict) -> Any:
        """``session`` (with positions) has just joined ``group``: answer and replay (at once, or
        an awaitable when the store answers later)."""
        since = frame.get("since")
        store = self.store
        if since is None:
            result: Any = then_map(store.position(group), lambda p: (None, p, []))
        elif isinstance(since, dict):
            result = store.since(group, since.get("epoch"), since.get("offset"))
        else:
            result = then_map(store.position(group), lambda p: (False, p, []))
        if not inspect.isawaitable(result):
            self._answer(session, group, page, params, result)
            return None
        holding = self.holding.get(group)
        if holding is None:
            holding = self.holding[group] = weakref.WeakKeyDictionary()
        state = holding[session] = Held()
        return asyncio.ensure_future(self._later(session, group, page, params, result, state))

    async def _later(self, session: Any, group: str, page: str, params: dict, result: Any,
                     state: Held) -> None:
        try:
            answer = await result
        except Exception as exc:
            log.warning("recovery of %s failed (%s): answering recovered=false", group, exc)
            answer = (False, None, [])
        held, state.frames = state.frames or [], None
        if session.pages.get(group) is None:
            return  # it left meanwhile
        last = self._answer(session, group, page, params, answer)
        state.skip = last
        for position, framed in held:
            if last is None or position[0] != last[0] or position[1] > last[1]:
                state.skip = None
                self.hub.send(session, framed)

    def _answer(self, session: Any, group: str, page: str, params: dict, result: Any) -> Optional[Position]:
        """Queue the page_add and the replay; returns the last position they cover."""
        recovered, position, entries = result
        answer: Dict[str, Any] = {"type": "page_add", "page": page, "parameters": params}
        if recovered is not None:
            answer["recovered"] = recovered
        if position is None:  # the store failed: no position to give
            epoch, offset = "", 0
        else:
            epoch, offset = position
            answer["position"] = {"epoch": epoch, "offset": offset}
        try:
            text = ujson.dumps(answer, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate in the echoed parameters (see page_frame)
            text = ujson.dumps(answer).encode()
        send = self.hub.send
        send(session, text_frame(text))
        user_id = session.user_id
        last = position
        for n, _, data, exclude in entries:
            last = (epoch, n)
            if exclude and user_id in exclude:
                continue
            send(session, positioned_frame(data, epoch, n))
        return last


def then_map(value: Any, fn: Any) -> Any:
    """``fn(value)``, or an awaitable of it when ``value`` is awaitable."""
    if not inspect.isawaitable(value):
        return fn(value)

    async def later() -> Any:
        return fn(await value)
    return later()
