"""The hub: this process's index of live connections and the fan-out of pre-framed messages.

The hub answers *which connections* are behind a web_socket_id, a user id or a group name, and
writes one already-serialized, already-framed message to a set of connections. It never decides
whether a user may see a page (that is :mod:`tornado_rt.policy`'s job) and never serializes.

Fan-out is the hot path. Per recipient it does one list append (and, for the first message of
the loop iteration, one more append to the dirty list). Once per IOLoop iteration :meth:`Hub.flush`
hands each dirty session's queue to its transport, which writes it with one write (see
:class:`tornado_rt.transport.Transport`), and checks the bytes still buffered against
``max_outgoing_buffer``.

The hub indexes :class:`~tornado_rt.session.Session` objects: ``web_socket_id``, ``user_id``,
``pages`` (dict: group -> subscription), ``out`` (list of queued frames), ``transport`` (with
``flush() -> bytes still buffered``) and ``close(code, reason)``. Only the session mutates its
own state; the hub mutates only its indexes, ``pages`` and ``out``.

Besides the page groups it indexes *permission groups* (``permissions``: permission group ->
{page group: number of subscriptions}), maintained at subscribe, unsubscribe and remove, so that a
revocation or a deletion (``table_deleted``, ``group_deleted``) finds the affected subscriptions
without walking every connection: its cost is proportional to the subscriptions it drops, and a
permission group nobody is subscribed under costs one dictionary lookup. The index counts
subscriptions per (permission group, page group) pair, not connections (the members are in
``groups``), so it grows with the distinct pages, not with the connections.
"""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Dict, Hashable, Iterable, List, Optional, Set, Tuple

from . import closecodes
from .refusals import refuse
from .transport import frame

log = logging.getLogger("tornado_rt.hub")


def _permission_group(subscription: Any) -> Optional[str]:
    """A subscription's permission group; None (not indexed, so never revoked) when the page
    type's permission group cannot be computed (a plugin error, logged)."""
    try:
        return subscription.permission_group
    except Exception:
        log.warning("the permission group of %r cannot be computed; the page is not revocable",
                    subscription, exc_info=True)
        return None


#: ``text_frame(payload)``: an unmasked, unfragmented WebSocket text frame (RFC 6455 §5.2) around
#: UTF-8 ``payload``, the same bytes for every recipient (the transport's one frame builder).
text_frame = frame


class Hub:
    """Connection index and fan-out for one process. Use only on the IOLoop thread."""

    def __init__(self, max_outgoing_buffer: int = 8 * 1024 * 1024, max_total_outgoing_buffer: int = 0):
        self.connections: Dict[str, Any] = {}
        self.users: Dict[Hashable, Set[Any]] = {}
        self.groups: Dict[str, Set[Any]] = {}
        #: The connections opened with ``positions=1`` per group (a subset of ``groups``): they get
        #: page messages with their stream position (recovery extension, :mod:`tornado_rt.history`).
        self.positioned: Dict[str, Set[Any]] = {}
        #: Called as ``on_join(conn, group, subscription)`` when a connection joins a group and
        #: ``on_leave(conn, group, subscription)`` when it leaves it, however it leaves
        #: (unsubscribe, page_discard, revocation, close, drop): the presence extension.
        self.on_join: Optional[Callable[[Any, str, Any], None]] = None
        self.on_leave: Optional[Callable[[Any, str, Any], None]] = None
        #: A broker that routes page messages to the processes that have subscribers (Redis):
        #: ``register(group)`` is asked before the first connection of this process joins
        #: ``group`` (None: join now; an awaitable: join and confirm once it is done) and
        #: ``on_empty(group)`` is told when the last one left.
        self.register: Optional[Callable[[str], Optional[Awaitable[Any]]]] = None
        self.on_empty: Optional[Callable[[str], None]] = None
        #: Page groups being dropped for every subscriber at once (the table or view is gone):
        #: leaving them announces nothing to the other subscribers, who are dropped too.
        self.vanishing: Set[str] = set()
        #: permission group -> {page group: subscriptions under that permission group}
        self.permissions: Dict[str, Dict[str, int]] = {}
        self.anonymous = 0
        self.max_outgoing_buffer = max_outgoing_buffer
        self.max_total_outgoing_buffer = max_total_outgoing_buffer  # 0: no budget
        # sessions that Tornado held bytes for at their last flush -> how many (the budget's
        # estimate: a session that drained since is corrected when the estimate passes the budget)
        self._behind: Dict[Any, int] = {}
        self._behind_total = 0
        self._dirty: List[Any] = []
        self._flush_scheduled = False
        self._call_soon: Optional[Callable[..., Any]] = None

    def bind(self, call_soon: Callable[..., Any]) -> None:
        """Give the hub the loop's ``call_soon`` (done once, on the loop thread)."""
        self._call_soon = call_soon

    # --- index ----------------------------------------------------------------------------------
    def add(self, conn: Any) -> None:
        self.connections[conn.web_socket_id] = conn
        if conn.user_id is None:
            self.anonymous += 1
        else:
            self.users.setdefault(conn.user_id, set()).add(conn)

    def remove(self, conn: Any) -> None:
        """Forget a connection and all its subscriptions (silently). Idempotent."""
        if self.connections.pop(conn.web_socket_id, None) is None:
            return
        if conn.user_id is None:
            self.anonymous -= 1
        else:
            conns = self.users.get(conn.user_id)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self.users[conn.user_id]
        for group, subscription in conn.pages.items():
            self._leave(conn, group, subscription)
        conn.pages.clear()
        conn.out.clear()
        if self._behind:
            self._behind_total -= self._behind.pop(conn, 0)

    def ready(self, group: str) -> Optional[Awaitable[Any]]:
        """None when a connection may join ``group`` now (the common case: this process has
        subscribers on it already, or its broker needs no registration), else an awaitable to
        wait for before joining and confirming the subscription (see ``register``)."""
        if self.register is None or group in self.groups:
            return None
        return self.register(group)

    def subscribe(self, conn: Any, group: str, subscription: Any) -> None:
        """Put ``conn`` on ``group`` (once, however often it subscribes)."""
        if conn.web_socket_id not in self.connections:
            return
        old = conn.pages.get(group)
        joined = old is None
        if joined:
            self.groups.setdefault(group, set()).add(conn)
            if getattr(conn, "positions", False):
                self.positioned.setdefault(group, set()).add(conn)
        else:
            self._unindex(group, old)
        conn.pages[group] = subscription
        permission = _permission_group(subscription)
        if permission is not None:
            groups = self.permissions.get(permission)
            if groups is None:
                self.permissions[permission] = {group: 1}
            else:
                groups[group] = groups.get(group, 0) + 1
        if joined and self.on_join is not None:
            self.on_join(conn, group, subscription)

    def unsubscribe(self, conn: Any, group: str) -> Any:
        """Take ``conn`` off ``group``; returns the subscription it had, or None."""
        subscription = conn.pages.pop(group, None)
        if subscription is not None:
            self._leave(conn, group, subscription)
        return subscription

    def _leave(self, conn: Any, group: str, subscription: Any) -> None:
        members = self.groups.get(group)
        if members is not None:
            members.discard(conn)
            if not members:
                del self.groups[group]
                if self.on_empty is not None:
                    self.on_empty(group)
        positioned = self.positioned.get(group)
        if positioned is not None:
            positioned.discard(conn)
            if not positioned:
                del self.positioned[group]
        self._unindex(group, subscription)
        if self.on_leave is not None:
            self.on_leave(conn, group, subscription)

    def _unindex(self, group: str, subscription: Any) -> None:
        permission = _permission_group(subscription)
        if permission is None:
            return
        groups = self.permissions.get(permission)
        if groups is None:
            return
        left = groups.get(group, 0) - 1
        if left > 0:
            groups[group] = left
        else:
            groups.pop(group, None)
            if not groups:
                del self.permissions[permission]

    def permission_subscriptions(self, permission_group: str,
                                 conns: Optional[Iterable[Any]] = None) -> List[Tuple[Any, str]]:
        """The (connection, page group) pairs subscribed under ``permission_group``, only those of
        ``conns`` when given; each connection's in the order of its ``pages``. Found through the
        permission index: the cost is the pages of the connections concerned, never a walk over
        every connection (and one lookup when nobody is subscribed under it)."""
        groups = self.permissions.get(permission_group)
        if not groups:
            return []
        if conns is None:
            concerned: Dict[Any, None] = {}  # an ordered set
            for group in groups:
                for conn in self.groups.get(group, ()):
                    concerned[conn] = None
            conns = concerned
        found: List[Tuple[Any, str]] = []
        for conn in conns:
            for group, sub in conn.pages.items():
                if group in groups and _permission_group(sub) == permission_group:
                    found.append((conn, group))
        return found

    def user_connections(self, user_ids: Iterable[Hashable]) -> Set[Any]:
        users = self.users
        found: Set[Any] = set()
        for user_id in user_ids:
            conns = users.get(user_id)
            if conns:
                found.update(conns)
        return found

    @property
    def subscriptions(self) -> int:
        return sum(len(members) for members in self.groups.values())

    # --- fan-out --------------------------------------------------------------------------------
    def deliver(self, frame: bytes, conns: Iterable[Any], ignore_web_socket_id: Optional[str] = None,
                exclude_user_ids: Optional[Set[Hashable]] = None) -> int:
        """Queue ``frame`` for every connection in ``conns`` except the ignored ones.

        Returns how many connections it was queued for. ``conns`` must not hold a connection
        twice (pass a set when merging audiences).
        """
        if ignore_web_socket_id is not None or exclude_user_ids:
            conns = [c for c in conns if c.web_socket_id != ignore_web_socket_id
                     and (not exclude_user_ids or c.user_id not in exclude_user_ids)]
        dirty = self._dirty
        mark = dirty.append
        n = 0
        for conn in conns:
            out = conn.out
            if not out:
                mark(conn)
            out.append(frame)
            n += 1
        if n and not self._flush_scheduled:
            self._schedule()
        return n

    def send(self, conn: Any, frame: bytes) -> None:
        """Queue ``frame`` for one connection, in order with everything else queued for it."""
        if not conn.out:
            self._dirty.append(conn)
        conn.out.append(frame)
        if not self._flush_scheduled:
            self._schedule()

    def after_flush(self, callback: Callable[..., Any], *args: Any) -> None:
        """Call ``callback(*args)`` once what is queued now has been written: right away when no
        flush is pending, else just after the pending one (the loop runs callbacks in order)."""
        if not self._flush_scheduled or self._call_soon is None:
            callback(*args)
        else:
            self._call_soon(callback, *args)

    def _schedule(self) -> None:
        self._flush_scheduled = True
        if self._call_soon is None:
            self.flush()
        else:
            self._call_soon(self.flush)

    def flush(self) -> None:
        """Write every dirty session's queued frames with one write each. A session whose
        unsent bytes pass ``max_outgoing_buffer`` is dropped (4009); when the unsent bytes of
        all sessions together pass ``max_total_outgoing_buffer``, see :meth:`_over_budget`."""
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        limit = self.max_outgoing_buffer
        budget = self.max_total_outgoing_buffer
        behind = self._behind
        for session in dirty:
            held = session.transport.flush()
            if held:  # the slow path only: Tornado holds bytes, the write went through IOStream
                if held > limit and limit:
                    session.close(closecodes.SLOW_CONSUMER, "slow consumer")
                elif budget:
                    self._behind_total += held - behind.get(session, 0)
                    behind[session] = held
        if budget and self._behind_total > budget:
            self._over_budget(budget)

    def _over_budget(self, budget: int) -> None:
        """The estimate of the bytes held behind readers passed the budget: measure them again
        (readers drain between flushes) and, while still over, drop the sessions holding the
        most first (4009, counted as slow_consumer; refusal ``total_outgoing_buffer``)."""
        behind = self._behind
        total = 0
        for session in list(behind):
            held = session.transport.buffered()
            if held:
                behind[session] = held
                total += held
            else:
                del behind[session]
        self._behind_total = total
        if total <= budget:
            return
        for session in sorted(behind, key=behind.__getitem__, reverse=True):
            held = behind.pop(session)
            refuse("connection", "total_outgoing_buffer", level=logging.WARNING, queued=held,
                   total=total, budget=budget)
            total -= held
            self._behind_total = total
            session.close(closecodes.SLOW_CONSUMER, "slow consumer: total outgoing buffer over budget")
            if total <= budget:
                break
        self._behind_total = total

    def close(self, conn: Any, code: int, reason: str) -> None:
        """Close ``conn`` with ``code`` after what is queued for it."""
        try:
            conn.close(code, reason)
        except Exception:  # a connection closing under us must not break a fan-out
            log.debug("close of %s failed", conn.web_socket_id, exc_info=True)
