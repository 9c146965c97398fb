"""The router: turns an envelope that reached this process into writes to its connections.

Every process runs every envelope through its own router, in the order the broker hands them
over: audiences that depend on membership are resolved here against the access policy *at
delivery*, so that processes that apply the same events in the same order agree on who is a
member. After delivery the message type's side effect (directory update, page revocation) runs
through an :class:`EffectContext`.

The access policy and the side effects may be asynchronous (see :mod:`tornado_rt.hooks`, the
one place that tells sync from async). An envelope whose hooks answer at once is delivered at
once (the common case, and the fast one; a page audience without an effect never calls a hook).
When a hook answers with an awaitable, the router keeps every later envelope in a queue until
that one is done, so message order never depends on policy latency.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Awaitable, Callable, Iterable, Optional, Set, Tuple

import ujson

from . import closecodes
from .envelope import DIRECTORY, DISCONNECT, INDIVIDUAL, MESSAGE, PRESENCE, REVOKE, Envelope
from .history import HistoryStore, positioned_frame
from .hooks import Hooks, gather, pending, then
from .hub import Hub, text_frame
from .policy import AccessPolicy, Directory
from .principal import normalize_id
from .registry import PageType, Registry

log = logging.getLogger("tornado_rt.router")

_FORCE_DISCONNECT = text_frame(b'{"type":"force_disconnect"}')


def page_frame(kind: str, page: str, parameters: dict) -> bytes:
    """A ``page_add`` / ``page_discard`` message, framed. ``parameters`` are echoed as the client
    sent them; a lone surrogate (valid JSON escape, not encodable as UTF-8) is echoed escaped."""
    message = {"type": kind, "page": page, "parameters": parameters}
    try:
        data = ujson.dumps(message, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        data = ujson.dumps(message).encode()
    return text_frame(data)


class Subscription:
    """One page a connection is subscribed to (stored in ``conn.pages[group]``).

    Kept small, since an idle connection is mostly its subscriptions: the shared page type and
    the parameter values; the parameters dict and the permission group are derived when a
    revocation or a ``page_discard`` needs them (rare, next to delivery).
    """

    __slots__ = ("page_type", "values")

    def __init__(self, page_type: PageType, parameters: dict):
        self.page_type = page_type
        self.values = tuple(parameters[p] for p in page_type.parameters)

    @property
    def page(self) -> str:
        return self.page_type.name

    @property
    def parameters(self) -> dict:
        return dict(zip(self.page_type.parameters, self.values))

    @property
    def permission_group(self) -> Optional[str]:
        return self.page_type.permission_group(self.parameters)


class EffectContext:
    """What a message type's side effect may do. Given to ``MessageType.effect(ctx, message)``.

    ``directory``: the in-memory :class:`~tornado_rt.policy.Directory` when the server uses one,
    else ``None`` (the application's own policy is then the source of truth). ``policy``: the
    access policy. ``audience``: the audience spec the message was delivered to (see
    :mod:`tornado_rt.envelope`), e.g. ``["workspaces", [3], None]`` for an explicit workspace.
    ``revoke``, ``drop_permission_group`` and ``drop_group`` act on this process's connections.
    """

    def __init__(self, router: "Router"):
        self._router = router
        self.policy = router.policy
        self.directory = router.policy if isinstance(router.policy, Directory) else None
        self.audience: Optional[list] = None

    def drop_group(self, group: str) -> int:
        """Drop every connection's subscription to the page ``group`` (with ``page_discard``)."""
        return self._router.drop_group(group)

    def revoke(self, user_ids: Iterable[Any], permission_group: str) -> int:
        return self._router.revoke(user_ids, permission_group)

    def drop_permission_group(self, permission_group: str) -> int:
        return self._router.drop_permission_group(permission_group)

    @staticmethod
    def then(value: Any, fn: Callable[[Any], Any]) -> Any:
        """Apply ``fn`` to a policy result that may be awaitable; returns an awaitable if it was."""
        return then(value, fn)

    @staticmethod
    def gather(values: Iterable[Any]) -> Any:
        """The list of policy results ``values``; an awaitable of it if any was awaitable."""
        return gather(values)


class Router:
    """Delivers envelopes to this process's connections; see the module docstring."""

    def __init__(self, registry: Registry, policy: AccessPolicy, hub: Hub,
                 on_delivered: Optional[Callable[[str, int], None]] = None,
                 hooks: Optional[Hooks] = None):
        self.registry = registry
        self.policy = policy
        self.hub = hub
        self.hooks = hooks if hooks is not None else Hooks(None, policy)
        self.on_delivered = on_delivered
        self.effects = EffectContext(self)
        #: The recovery extension's store (None: disabled, ``history_size = 0``).
        self.history: Optional[HistoryStore] = None
        #: group -> {session: [(position, frame)]}: live messages held while a subscription is
        #: being recovered asynchronously (:class:`tornado_rt.history.Recovery`).
        self.holding: dict = {}
        #: ``on_presence(kind, group, user_id, version)``: a cluster-wide presence event (presence
        #: extension; ``version`` ``(epoch, n)`` or None).
        self.on_presence: Optional[Callable[[Any, str, Any, Any], None]] = None
        self._waiting: Optional[collections.deque] = None  # envelopes behind an async one
        self._idle: Optional[asyncio.Future] = None

    # --- in order ---------------------------------------------------------------------------------
    def dispatch(self, envelope: Envelope) -> None:
        """Deliver now, or queue behind an envelope that is waiting for an async hook."""
        if self._waiting is not None:
            self._waiting.append(envelope)
            return
        audience = envelope.audience
        if audience is not None and audience[0] == "page" and envelope.kind == MESSAGE:
            mt = self.registry.message_type(envelope.type)
            if mt is None or mt.effect is None:  # the common case: no policy call, no effect
                self._deliver(envelope, self.hub.groups.get(audience[1], ()))
                return
        waiting = self._route(envelope)
        if waiting is not None:
            self._waiting = collections.deque()
            asyncio.ensure_future(self._finish_in_order(waiting))

    def _route(self, envelope: Envelope) -> Optional[Awaitable[Any]]:
        """Deliver one envelope; returns None when done, or what is left to await."""
        try:
            return pending(self._handle(envelope))
        except Exception:
            log.exception("delivery failed")
            return None

    async def _finish_in_order(self, waiting: Optional[Awaitable[Any]]) -> None:
        """Await the envelope in progress, then deliver the queued ones in order (awaiting again
        whenever one of them waits for a hook)."""
        try:
            while waiting is not None:
                try:
                    await waiting
                except Exception:
                    log.exception("access policy failed during delivery; envelope dropped")
                waiting = None
                while waiting is None and self._waiting:
                    waiting = self._route(self._waiting.popleft())
        finally:
            self._waiting = None
            idle, self._idle = self._idle, None
            if idle is not None and not idle.done():
                idle.set_result(None)

    @property
    def busy(self) -> bool:
        """Whether an envelope is waiting for an async hook (later ones are queued behind it)."""
        return self._waiting is not None

    async def wait_idle(self) -> None:
        """Return once every envelope handed to :meth:`dispatch` so far has been delivered."""
        if self._waiting is None:
            return
        if self._idle is None:
            self._idle = asyncio.get_running_loop().create_future()
        await self._idle

    # --- one envelope -------------------------------------------------------------------------------
    def _handle(self, env: Envelope) -> Any:
        """Deliver ``env``; returns None, or an awaitable when a hook answered asynchronously."""
        kind = env.kind
        hub = self.hub
        if kind == MESSAGE:
            assert env.audience is not None, "a message envelope names its audience"
            return then(self._audience(env.audience), lambda conns: self._deliver_message(env, conns))
        if kind == INDIVIDUAL:
            for user_id, type_name, data in env.payloads or ():
                conns = hub.users.get(normalize_id(user_id), ())
                n = hub.deliver(text_frame(data.encode()), conns, env.ignore) if conns else 0
                env.delivered += n
                if self.on_delivered is not None:
                    self.on_delivered(type_name, n)
        elif kind == DISCONNECT:
            self.disconnect(env.user_ids or (), env.ignore or ())
        elif kind == REVOKE:
            assert env.permission_group, "a revoke envelope names its permission group"
            self.revoke(env.user_ids or (), env.permission_group)
        elif kind == DIRECTORY:
            self._apply_directory(env)
        elif kind == PRESENCE:
            if self.on_presence is not None and env.audience and env.user_ids:
                self.on_presence(env.type, env.audience[1], env.user_ids[0], _presence_version(env.data))
        else:
            log.warning("unknown envelope kind %r ignored", kind)
        return None

    def _apply_directory(self, env: Envelope) -> None:
        """A directory change, at its place in the order of every process (validated by the
        publisher; a refusal here means processes disagree and is logged)."""
        directory = self.effects.directory
        if directory is None:
            log.warning("directory change %r ignored: this server's access policy is not the "
                        "in-memory directory", env.type)
            return
        try:
            directory.apply(env.type or "", ujson.loads(env.data or "[]"))
        except ValueError as exc:
            log.error("directory change %r refused: %s", env.type, exc)

    def _audience(self, audience: list) -> Any:
        """The connections of an audience (an awaitable of them when the policy is async)."""
        how = audience[0]
        hub = self.hub
        if how == "page":
            return hub.groups.get(audience[1], ())
        if how == "users":
            return hub.user_connections(audience[1])
        if how == "all":
            return list(hub.connections.values())
        return then(self.hooks.members(audience), hub.user_connections)

    def _deliver_message(self, env: Envelope, conns: Any) -> Any:
        """Deliver, then run the message type's side effect (which may return an awaitable)."""
        self._deliver(env, conns)
        mt = self.registry.message_type(env.type)
        if mt is None or mt.effect is None:
            return None
        message = ujson.loads(env.data or "")  # effects are rare; the text is the truth
        self.effects.audience = env.audience
        return self.hooks.effect(mt.effect, self.effects, message)

    def _deliver(self, env: Envelope, conns: Any) -> None:
        """Frame a message envelope once and queue it for ``conns`` (minus the excluded)."""
        data, type_name = env.data, env.type
        assert data is not None and type_name is not None, "a message envelope has a type and text"
        exclude = set(env.exclude) if env.exclude else None
        history = self.history
        audience = env.audience
        if history is not None and audience is not None and audience[0] == "page":
            # recorded in the page's history even when nobody here has it open (recovery)
            n = self._deliver_positioned(history, env, conns, exclude)
        elif conns:  # nobody to frame it for: the common case of a page nobody has open
            n = self.hub.deliver(text_frame(data.encode()), conns, env.ignore, exclude)
        else:
            n = 0
        if n:
            env.delivered += n
        if self.on_delivered is not None:
            self.on_delivered(type_name, n)

    def _deliver_positioned(self, history: HistoryStore, env: Envelope, conns: Any,
                            exclude: Optional[set]) -> int:
        """A page message while the recovery extension is on: recorded in the group's history
        (when it keeps one). Every recipient is queued the same shared frame as without the
        extension; then, for the connections with positions only, that last queued frame is
        swapped for the one with the position (no per-recipient work for the others). Nobody
        here on the page: recorded only, nothing framed (a positioned connection is in
        ``conns`` too, so none is waiting for the positioned frame either)."""
        group = env.audience[1]  # type: ignore[index]
        if not conns:
            history.record(group, env)
            return 0
        hub = self.hub
        frame = text_frame(env.data.encode())  # type: ignore[union-attr]
        n = hub.deliver(frame, conns, env.ignore, exclude)
        position = history.record(group, env)
        opted = hub.positioned.get(group) if position is not None else None
        if opted:
            framed = positioned_frame(env.data, *position)  # type: ignore[arg-type,misc]
            held = self.holding.get(group)
            for conn in opted:
                out = conn.out
                if out and out[-1] is frame:  # queued just now (not ignored nor excluded)
                    state = held.get(conn) if held is not None else None
                    if state is None or not state.take(out, position, framed):  # see history.Held
                        out[-1] = framed
        return n

    # --- server-initiated subscription changes ---------------------------------------------------
    def disconnect(self, user_ids: Iterable[Any], ignore_web_socket_ids: Iterable[str] = ()) -> int:
        """Send force_disconnect and close (4003) every connection of these users but the spared."""
        spared = set(ignore_web_socket_ids)
        conns = [c for c in self.hub.user_connections(normalize_id(u) for u in user_ids)
                 if c.web_socket_id not in spared]
        for conn in conns:
            self.hub.send(conn, _FORCE_DISCONNECT)
            self.hub.close(conn, closecodes.FORCE_DISCONNECT, "force disconnect")
        return len(conns)

    def revoke(self, user_ids: Iterable[Any], permission_group: str) -> int:
        """Drop the users' pages in ``permission_group``, one page_discard per dropped page.

        Uses the hub's permission index: a permission group nobody is subscribed under costs one
        lookup, whatever the number of users or connections."""
        hub = self.hub
        if permission_group not in hub.permissions:
            return 0
        conns = hub.user_connections(normalize_id(u) for u in user_ids)
        return self._drop(hub.permission_subscriptions(permission_group, conns))

    def drop_permission_group(self, permission_group: str) -> int:
        """Drop every connection's pages in ``permission_group`` (the table was deleted); costs
        what it drops (the hub's permission index), not a walk over every connection."""
        found = self.hub.permission_subscriptions(permission_group)
        return self._vanish({group for _, group in found}, found)

    def drop_group(self, group: str) -> int:
        """Drop every connection's subscription to the page ``group`` (a public view went away)."""
        return self._vanish({group}, [(conn, group) for conn in list(self.hub.groups.get(group, ()))])

    def drop_all_pages(self) -> int:
        """Drop every page subscription of this process (with ``page_discard``): the broker lost
        envelopes it cannot replay, so clients must resubscribe and refetch."""
        return sum(self.drop_group(group) for group in list(self.hub.groups))

    def _vanish(self, groups: Set[str], found: Iterable[Tuple[Any, str]]) -> int:
        """Drop pages that go away for every subscriber: no presence event is announced to the
        others while they go (they are dropped too), whatever order they are dropped in."""
        vanishing = self.hub.vanishing
        vanishing.update(groups)
        try:
            return self._drop(found)
        finally:
            vanishing.difference_update(groups)

    def _drop(self, found: Iterable[Tuple[Any, str]]) -> int:
        dropped = 0
        for conn, group in found:
            self._discard(conn, group)
            dropped += 1
        return dropped

    def _discard(self, conn: Any, group: str) -> None:
        """Take ``conn`` off ``group`` and tell it with ``page_discard``."""
        sub = self.hub.unsubscribe(conn, group)
        self.hub.send(conn, page_frame("page_discard", sub.page, sub.parameters))


def _presence_version(data: Optional[str]) -> Optional[Tuple[str, int]]:
    """The presence version ``(epoch, n)`` a presence envelope carries in ``data`` (None if absent
    or malformed: the event then goes to every watcher, as before versions existed)."""
    if not data:
        return None
    try:
        epoch, n = ujson.loads(data)
        return (str(epoch), int(n))
    except (ValueError, TypeError):
        return None
