"""The hub: this process's index of live connections and the fan-out of pre-framed messages.

The hub answers *which connections* are behind a web_socket_id, a user id or a group name, and
writes one already-serialized, already-framed message to a set of connections. It never decides
whether a user may see a page (that is :mod:`tornado_rt.policy`'s job) and never serializes.

Fan-out is the hot path. Per recipient it does one list append (and, for the first message of
the loop iteration, one more append to the dirty list). Once per IOLoop iteration :meth:`Hub.flush`
joins each dirty connection's frames and hands them to its stream in a single write, then checks
that connection's unsent bytes against ``max_outgoing_buffer``.

A connection object given to the hub must have the attributes ``web_socket_id``, ``user_id``,
``pages`` (dict: group -> subscription), ``out`` (list of pending frames), ``stream`` (a Tornado
IOStream, or None while not open), ``sock`` (the plain TCP socket behind the stream, or None
when direct sends are not allowed: TLS, not open, closing), ``backlog`` (whether Tornado still
buffers bytes of it) and a method ``close(code, reason)``.
"""
from __future__ import annotations

import logging
import struct
from typing import Any, Callable, Dict, Hashable, Iterable, List, Optional, Set

from tornado.iostream import StreamClosedError

from . import closecodes

log = logging.getLogger("tornado_rt.hub")

_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented WebSocket text frame (RFC 6455 §5.2) around UTF-8 ``payload``.

    Server-to-client frames are never masked, so the same bytes serve every recipient.
    """
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return _pack_short(0x81, 126, n) + payload
    return _pack_long(0x81, 127, n) + payload


class Hub:
    """Connection index and fan-out for one process. Use only on the IOLoop thread."""

    def __init__(self, max_outgoing_buffer: int = 8 * 1024 * 1024):
        self.connections: Dict[str, Any] = {}
        self.users: Dict[Hashable, Set[Any]] = {}
        self.groups: Dict[str, Set[Any]] = {}
        self.anonymous = 0
        self.delivered = 0
        self.max_outgoing_buffer = max_outgoing_buffer
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
        for group in conn.pages:
            self._leave(conn, group)
        conn.pages.clear()
        conn.out.clear()

    def subscribe(self, conn: Any, group: str, subscription: Any) -> None:
        """Put ``conn`` on ``group`` (once, however often it subscribes)."""
        if conn.web_socket_id not in self.connections:
            return
        if group not in conn.pages:
            self.groups.setdefault(group, set()).add(conn)
        conn.pages[group] = subscription

    def unsubscribe(self, conn: Any, group: str) -> Any:
        """Take ``conn`` off ``group``; returns the subscription it had, or None."""
        subscription = conn.pages.pop(group, None)
        if subscription is not None:
            self._leave(conn, group)
        return subscription

    def _leave(self, conn: Any, group: str) -> None:
        members = self.groups.get(group)
        if members is not None:
            members.discard(conn)
            if not members:
                del self.groups[group]

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
        if n:
            self.delivered += n
            if not self._flush_scheduled:
                self._schedule()
        return n

    def send(self, conn: Any, frame: bytes) -> None:
        """Queue ``frame`` for one connection, in order with everything else queued for it."""
        if not conn.out:
            self._dirty.append(conn)
        conn.out.append(frame)
        if not self._flush_scheduled:
            self._schedule()

    def _schedule(self) -> None:
        self._flush_scheduled = True
        if self._call_soon is None:
            self.flush()
        else:
            self._call_soon(self.flush)

    def flush(self) -> None:
        """Write every dirty connection's queued frames with one socket write each."""
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        write = self._write
        limit = self.max_outgoing_buffer
        for conn in dirty:
            write(conn, limit)

    def flush_one(self, conn: Any) -> None:
        """Write what is queued for ``conn`` now (before closing it, for instance)."""
        self._write(conn, 0)

    def _write(self, conn: Any, limit: int) -> None:
        out = conn.out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        sock = conn.sock
        if sock is not None and not conn.backlog:
            # Nothing of this connection waits in Tornado's buffer, so order allows a direct send;
            # when the kernel takes it all (the usual case) the IOStream machinery (a Future,
            # buffer bookkeeping) is skipped. Whatever is left, and every error, goes the normal way.
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            if sent:
                data = memoryview(data)[sent:]
        stream = conn.stream
        if stream is None:
            return
        try:
            stream.write(data)
        except StreamClosedError:
            return
        buffered = stream._write_buffer  # None when this write found the peer gone (reset)
        if buffered is None:
            return
        size = len(buffered)
        conn.backlog = size > 0  # direct sends wait until Tornado has written all of it
        if limit and size > limit:
            self.close(conn, closecodes.SLOW_CONSUMER, "slow consumer")

    def close(self, conn: Any, code: int, reason: str) -> None:
        """Flush what is queued for ``conn``, then close it with ``code``."""
        self.flush_one(conn)
        try:
            conn.close(code, reason)
        except Exception:  # a connection closing under us must not break a fan-out
            log.debug("close of %s failed", conn.web_socket_id, exc_info=True)
