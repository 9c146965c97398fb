"""Presence: who is looking at a page (protocol extension, docs/protocol.md "Extensions").

A page type declares ``presence=True`` (the database plugin's ``table`` and ``row`` do; the public
``view`` does not). :class:`Presence` counts, per group of such a page, the connections of each
user (and the anonymous ones), fed by the hub's ``on_join`` / ``on_leave`` callbacks, so every way
of leaving counts: unsubscribe, ``page_discard`` of any kind, revocation, close, force
disconnect, ping timeout.

A subscriber asks with the client action ``{"presence": "table", "table_id": 10}`` (registered by
the core plugin through :class:`~tornado_rt.registry.ClientAction`, see :func:`presence_action`):

* it gets ``{"type": "presence", "page", "parameters", "users": [{"user_id", "connections"}],
  "anonymous": N}`` (users in the order they arrived);
* from then on, while it stays subscribed, ``presence_joined`` when a user's first connection
  joins the page and ``presence_left`` when the user's last one leaves it, queued in order with
  the page's other messages;
* asking about a page it is not subscribed to, or one without presence, gets nothing.

A connection that never asks receives none of these frames. The counts live behind
:class:`PresenceStore`: :class:`LocalPresence` in one process, :mod:`tornado_rt.redis_presence`
with the Redis broker (cluster-wide answers and events).
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, List, Optional, Tuple, Union

import inspect
import logging

import ujson

from .hooks import then
from .hub import Hub, text_frame
from .refusals import refuse, safe_params
from .registry import PageType

#: Why a ``presence`` request got no answer (``kind="presence"`` in the refusal counter and log,
#: at DEBUG: a client's mistake, never a security matter).
PRESENCE_REASONS = {
    "no_presence": "the page type does not track presence (e.g. the public view)",
    "missing_parameter": "a required parameter of the page type is absent or null",
    "not_subscribed": "the connection is not subscribed to that page",
}


class PresenceStore:
    """The counts behind presence (the interface). ``join``/``leave`` return True when the user's
    first connection joined / last one left the group (user_id None: an anonymous connection)."""

    def join(self, group: str, user_id: Optional[Hashable]) -> bool:
        raise NotImplementedError

    def leave(self, group: str, user_id: Optional[Hashable]) -> bool:
        raise NotImplementedError

    def snapshot(self, group: str) -> Any:
        """``([(user_id, connections)], anonymous connections)`` of the group, or an awaitable of
        it (a store that asks another process, e.g. Redis). A store whose events come later
        (through the broker) appends the presence version the snapshot reflects, ``(epoch, n)``
        or None (see :meth:`Presence.event`)."""
        raise NotImplementedError

    async def start(self) -> None:
        """Called once the server runs on its loop (before any connection)."""

    async def close(self) -> None:
        """Called at shutdown."""


class LocalPresence(PresenceStore):
    """The counts of this process."""

    def __init__(self) -> None:
        self.users: Dict[str, Dict[Hashable, int]] = {}
        self.anonymous: Dict[str, int] = {}

    def join(self, group: str, user_id: Optional[Hashable]) -> bool:
        if user_id is None:
            self.anonymous[group] = self.anonymous.get(group, 0) + 1
            return False
        users = self.users.setdefault(group, {})
        count = users.get(user_id, 0) + 1
        users[user_id] = count
        return count == 1

    def leave(self, group: str, user_id: Optional[Hashable]) -> bool:
        if user_id is None:
            left = self.anonymous.get(group, 0) - 1
            if left > 0:
                self.anonymous[group] = left
            else:
                self.anonymous.pop(group, None)
            return False
        users = self.users.get(group)
        if not users or user_id not in users:
            return False
        count = users[user_id] - 1
        if count:
            users[user_id] = count
            return False
        del users[user_id]
        if not users:
            del self.users[group]
        return True

    def snapshot(self, group: str) -> Tuple[List[Tuple[Hashable, int]], int]:
        return list(self.users.get(group, {}).items()), self.anonymous.get(group, 0)


class _Held(List[Tuple[str, Hashable, Optional[Tuple[str, int]]]]):
    """The presence events that came for a watcher while the store computed its answer."""


def _reflected(version: Optional[Tuple[str, int]], seen: Optional[Tuple[str, int]]) -> bool:
    """Whether an answer of version ``seen`` already counted the change of an event of
    ``version`` (same epoch, not later). Without versions: no (the event is sent)."""
    return version is not None and seen is not None and version[0] == seen[0] and version[1] <= seen[1]


def _frame(message: Dict[str, Any]) -> bytes:
    try:
        return text_frame(ujson.dumps(message, ensure_ascii=False).encode())
    except UnicodeEncodeError:  # a lone surrogate in echoed parameters (see router.page_frame)
        return text_frame(ujson.dumps(message).encode())


class Presence:
    """Presence of this process's connections; installs itself as the hub's join/leave callbacks."""

    def __init__(self, hub: Hub, store: Optional[PresenceStore] = None):
        self.hub = hub
        self.store = store if store is not None else LocalPresence()
        #: group -> {connection that asked for the group's presence (and is subscribed to it):
        #: the presence version its answer reflects, ``(epoch, n)``, or None (a store without
        #: versions: the local one, whose events are synchronous), or the events held while the
        #: store answers (:class:`_Held`)}
        self.watchers: Dict[str, Dict[Any, Union[None, Tuple[str, int], _Held]]] = {}
        hub.on_join = self.joined
        hub.on_leave = self.left

    def event(self, kind: str, group: str, user_id: Hashable, version: Optional[Tuple[str, int]] = None) -> None:
        """A presence event decided elsewhere (the cluster-wide store, through the broker).
        ``version``: the page's presence version of the event, ``(epoch, n)``. A watcher whose
        answer reflects that version or a later one of the same epoch already counted the change
        and does not get the event (the store decides versions and answers atomically, so the
        answer either includes the change and has a version >= n, or excludes it and has a
        version < n or another epoch)."""
        if kind in ("presence_joined", "presence_left"):
            self._announce(kind, group, user_id, version)

    def joined(self, conn: Any, group: str, subscription: Any) -> None:
        if subscription.page_type.presence and self.store.join(group, conn.user_id):
            self._announce("presence_joined", group, conn.user_id)

    def left(self, conn: Any, group: str, subscription: Any) -> None:
        watchers = self.watchers.get(group)
        if watchers is not None:
            watchers.pop(conn, None)
            if not watchers:
                del self.watchers[group]
        if (subscription.page_type.presence and self.store.leave(group, conn.user_id)
                and group not in self.hub.vanishing):  # the page is gone for everyone: no news
            self._announce("presence_left", group, conn.user_id)

    def _announce(self, kind: str, group: str, user_id: Hashable,
                  version: Optional[Tuple[str, int]] = None) -> None:
        watchers = self.watchers.get(group)
        if not watchers:
            return
        frames: Dict[tuple, bytes] = {}  # one frame per distinct parameters (7 and "7" differ)
        send = self.hub.send
        for conn, seen in watchers.items():
            if isinstance(seen, _Held):  # its answer is on its way: decided when it comes
                seen.append((kind, user_id, version))
                continue
            if _reflected(version, seen):
                continue  # its answer already reflected this change
            sub = conn.pages.get(group)
            if sub is None:
                continue
            frame = frames.get(sub.values)
            if frame is None:
                frame = frames[sub.values] = _frame({"type": kind, "page": sub.page,
                                                     "parameters": sub.parameters, "user_id": user_id})
            send(conn, frame)

    def ask(self, conn: Any, page_type: PageType, params: dict) -> Any:
        """The client action: answer with the group's presence and watch it from now on.
        Returns an awaitable when the store answers asynchronously (the session waits for it
        before the connection's next frame, so its requests stay in order)."""
        reason = ("no_presence" if not page_type.presence
                  else "missing_parameter" if page_type.missing(params) is not None
                  else "not_subscribed" if page_type.group(params) not in conn.pages else None)
        if reason is not None:  # nothing on the wire, like any refused request; counted and logged
            refuse("presence", reason, level=logging.DEBUG, key=conn.web_socket_id, page=page_type.name,
                   parameters=safe_params(params), user_id=conn.user_id)
            return None
        group = page_type.group(params)

        def answer(snapshot: Tuple[Any, ...]) -> None:
            if group not in conn.pages:
                return  # it left the page while the store was answering
            users, anonymous = snapshot[0], snapshot[1]
            # the version the answer reflects (a store that has versions, e.g. Redis; see event())
            version = snapshot[2] if len(snapshot) > 2 else None
            watchers = self.watchers.setdefault(group, {})
            held = watchers.get(conn)
            watchers[conn] = version
            self.hub.send(conn, _frame({
                "type": "presence", "page": page_type.name, "parameters": params,
                "users": [{"user_id": user_id, "connections": n} for user_id, n in users],
                "anonymous": anonymous}))
            sub = conn.pages[group]
            if isinstance(held, _Held):  # events that came while the store answered: the later ones
                for kind, user_id, event_version in held:
                    if not _reflected(event_version, version):
                        self.hub.send(conn, _frame({"type": kind, "page": sub.page,
                                                    "parameters": sub.parameters, "user_id": user_id}))

        snapshot = self.store.snapshot(group)
        if inspect.isawaitable(snapshot):
            # Events that reach this process before the answer (decided after the store read the
            # answer, or before it) are held and sorted out by version when the answer comes.
            self.watchers.setdefault(group, {})[conn] = _Held()
        return then(snapshot, answer)


def presence_action(session: Any, page_type: PageType, params: dict, frame: dict) -> Any:
    """The ``presence`` client action (registered by the core plugin)."""
    presence: Optional[Presence] = getattr(session.ctx, "presence", None)
    if presence is not None and session.principal is not None:
        return presence.ask(session, page_type, params)
    return None
