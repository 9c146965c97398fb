"""The facade an embedding application touches: :class:`RealtimeServer`.

It wires settings, registry, access policy, authenticator, hub, router and broker together,
gives Tornado routes, and offers the publish API. Publishing is safe from any thread: the message
is validated and serialized on the calling thread and handed to the IOLoop with
``IOLoop.add_callback`` when the caller is not on it.
"""
from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import threading
import time
import uuid

import ujson
from collections import Counter
from typing import Any, Awaitable, Dict, Iterable, List, Mapping, Optional, Sequence, Type, Union

from tornado.ioloop import IOLoop
from tornado.web import Application, RequestHandler

from . import closecodes
from .auth import Authenticator, JWTAuthenticator
from .broker import Broker, BrokerUnavailable, LocalBroker
from .connection import Heartbeat, RealtimeHandler
from .envelope import (DISCONNECT, directory_envelope, INDIVIDUAL, MESSAGE, PRESENCE, REVOKE, Envelope, PublishError,
                       individual_envelope, message_envelope, id_list)
from .history import HistoryStore, MemoryHistory, Recovery
from .hooks import Hooks
from .hub import Hub
from .policy import AccessPolicy, Directory
from .presence import Presence
from .registry import Plugin, Registry, entry_point_plugins
from .router import Router
from .session import Session, SessionContext
from .settings import Settings

log = logging.getLogger("tornado_rt.server")


_FUTURE = asyncio.Future


def _awaitable(result: Any) -> bool:
    """``inspect.isawaitable``, answered at once for an asyncio future (what a multi-process
    broker's ``publish`` returns, once per envelope): ``isawaitable`` of a future goes through
    the ``Awaitable`` ABC check."""
    return type(result) is _FUTURE or inspect.isawaitable(result)


CLOSE_REASONS = {
    None: "client", 1000: "normal", 1001: "going_away", 1002: "protocol_error", 1007: "invalid_payload",
    1009: "message_too_big",
    1011: "internal_error", 1013: "too_many_connections_per_user",
    4001: "authentication_failed", 4003: "force_disconnect", 4008: "policy_violation",
    4009: "slow_consumer", "ping_timeout": "ping_timeout",
}


def builtin_plugins() -> List[Plugin]:
    """The core, database and premium plugins."""
    from tornado_rt_plugins import core, database, premium
    return [core.plugin, database.plugin, premium.plugin]


def tune_gc(threshold: int = 50_000) -> None:
    """Tune Python's garbage collector for a long-running server; call once, after start-up.

    Every connection is a few dozen container objects (handler, stream, coroutines), so with
    thousands of them the default thresholds make the collector walk them all again and again:
    the benchmark measured about a quarter of the server's CPU in collections during a connect
    storm, with pauses over 300 ms. This freezes everything allocated so far (``gc.freeze()``:
    the modules, the registry) and raises the first generation's threshold from 700 to
    ``threshold`` allocations. Reference cycles are still collected, only less often.
    Process-wide: ``tornado-rt serve`` calls it; an embedding application decides for itself.
    """
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(threshold, second, third)


def web_socket_id_from_request(handler: RequestHandler) -> Optional[str]:
    """The ``WebSocketId`` header of a REST call (docs/protocol.md §7), or None if absent or malformed.

    Pass it on as ``ignore_web_socket_id`` so the sender's own connection is skipped.
    """
    return web_socket_id_from_headers(handler.request.headers)


def web_socket_id_from_headers(headers: Any) -> Optional[str]:
    """:func:`web_socket_id_from_request` from the request's headers alone."""
    value = headers.get("WebSocketId")
    if not value:
        return None
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        return None


class Slicer:
    """Cuts a long piece of loop work into slices that yield to the loop (issue 10, item 9).

    ``if slicer.due(): await slicer.pause()`` after each unit of work: a slice ends after ``size``
    units or once it has taken ``budget`` seconds, whichever comes first, and the pause gives the
    loop one iteration (every socket that became ready is served, every ready callback runs,
    e.g. the hub's flush of what the slice queued). The count bound makes the number of pauses
    of an ``n``-unit job at least ``ceil(n / size) - 1`` whatever the machine's speed; the time
    bound keeps slices short on a slow or busy machine and with large units.
    """

    __slots__ = ("size", "budget", "pauses", "_n", "_started")

    def __init__(self, size: int, budget: float):
        self.size = max(1, size)
        self.budget = budget
        self.pauses = 0
        self._n = 0
        self._started = time.perf_counter()

    def due(self) -> bool:
        """Count one unit; whether the slice is over."""
        self._n += 1
        return self._n >= self.size or time.perf_counter() - self._started >= self.budget

    def restart(self) -> None:
        """Start a new slice without pausing (the caller yielded to the loop anyway)."""
        self._n = 0
        self._started = time.perf_counter()

    async def pause(self) -> None:
        await asyncio.sleep(0)
        self.pauses += 1
        self.restart()


class Counters:
    """Plain counters the metrics endpoint reads at scrape time (nothing on the hot path but +=)."""

    __slots__ = ("published", "delivered", "closed", "auth_failures", "connections_opened")

    def __init__(self) -> None:
        self.published: Counter = Counter()
        self.delivered: Counter = Counter()
        self.closed: Counter = Counter()
        self.auth_failures = 0
        self.connections_opened = 0

    def on_delivered(self, message_type: str, n: int) -> None:
        self.delivered[message_type] += n


class RealtimeServer:
    """A Baserow-compatible real-time server to embed in a Tornado application.

    ``settings``: :class:`~tornado_rt.Settings` (keyword overrides are applied on top).
    ``plugins``: extra plugins beside the built-in core, database and premium plugins and the
    installed ``tornado_rt.plugins`` entry points (``load_entry_points=False`` skips those), or
    pass a ready ``registry``. ``policy``: your :class:`~tornado_rt.AccessPolicy`; default a fresh
    in-memory :class:`~tornado_rt.Directory`. ``authenticator``: callable token -> principal, user
    id or None (sync or async); default a :class:`~tornado_rt.JWTAuthenticator` when a JWT key is
    configured. ``broker``: default :class:`~tornado_rt.LocalBroker`. ``handler_class``: a
    subclass of :class:`~tornado_rt.connection.RealtimeHandler` to serve the endpoint with.

    Large publishes (:meth:`submit`, ``POST /api/publish``) are worked through in slices of at
    most ``publish_slice`` envelopes or ``publish_slice_seconds`` seconds, with one loop iteration
    between slices, so that a 100,000-envelope batch does not stall every other connection and
    request (see :class:`Slicer`). Class attributes; set them on an instance to change them.
    """

    #: Envelopes per slice of a large publish at most (parsed, validated or published).
    publish_slice: int = 256
    #: Seconds per slice of a large publish at most (the slice ends early when it takes longer).
    publish_slice_seconds: float = 0.002

    def __init__(self, settings: Optional[Settings] = None, *, plugins: Iterable[Plugin] = (),
                 registry: Optional[Registry] = None, load_entry_points: bool = True,
                 policy: Optional[AccessPolicy] = None, authenticator: Optional[Authenticator] = None,
                 broker: Optional[Broker] = None, handler_class: type = RealtimeHandler,
                 **overrides: Any):
        settings = settings or Settings()
        if overrides:
            settings = settings.replace(**overrides)
        self.settings = settings
        if registry is None:
            chosen = builtin_plugins() + list(plugins)
            if load_entry_points:
                chosen += entry_point_plugins(exclude=[p.name for p in chosen])
            registry = Registry(chosen)
        self.registry = registry
        self.policy = policy if policy is not None else Directory()
        if authenticator is None and (settings.jwt_secret or settings.jwt_public_key):
            authenticator = JWTAuthenticator(settings)
        self.allowed_origins = {o.lower().rstrip("/") for o in settings.allowed_origins or ()}
        if not (isinstance(handler_class, type) and issubclass(handler_class, RealtimeHandler)):
            raise TypeError("handler_class must be a subclass of tornado_rt.connection.RealtimeHandler")
        self.handler_class = handler_class
        self.counters = Counters()
        self.hub = Hub(settings.max_outgoing_buffer, settings.total_outgoing_budget)
        self.hooks = Hooks(authenticator, self.policy)
        self.router = Router(self.registry, self.policy, self.hub, self.counters.on_delivered, self.hooks)
        self.sessions = SessionContext(self.hub, self.hooks, self.registry, settings,
                                       opened=self._connected, left=self._disconnected,
                                       auth_failed=self._auth_failed)
        # Protocol extensions (docs/protocol.md "Extensions"): recovery (history_size 0: off) and
        # presence; both opt-in per connection, neither changes a frame of a client that never asks.
        self.history: Optional[HistoryStore] = None
        self.broker = broker if broker is not None else LocalBroker()
        if settings.history_size:
            hub = self.hub
            # A broker that numbers page messages cluster-wide (Redis) keeps the history itself.
            self.history = (self.broker.history_store(settings.history_size, settings.history_ttl,
                                                      lambda: list(hub.positioned))
                            or MemoryHistory(settings.history_size, settings.history_ttl,
                                             live=lambda group: group in hub.positioned))
            self.router.history = self.history
            recovery = Recovery(self.hub, self.history)
            self.router.holding = recovery.holding
            self.sessions.recovery = recovery
        self.presence = Presence(self.hub)
        self.sessions.presence = self.presence
        self.broker.attach(self.router.dispatch)
        self.broker.configure(settings, self._lost_envelopes)
        bind_hub = getattr(self.broker, "bind_hub", None)
        if bind_hub is not None:  # the Redis broker routes page messages to processes with subscribers
            bind_hub(self.hub, self.router, self.registry)
        share = getattr(self.broker, "share_directory", None)
        if share is not None and self.directory is not None:
            share(self.directory, self.router)  # the Redis broker keeps its snapshot, if asked to
        presence_store = self.broker.presence_store(settings.presence_ttl)
        if presence_store is not None:  # cluster-wide presence (the Redis broker)
            self.presence.store = presence_store
            presence_store.announce = self._announce_presence
            presence_store.watched = lambda: list(self.presence.watchers)
            self.router.on_presence = self.presence.event
        self.heartbeat = Heartbeat(self.hub, settings.ping_interval, settings.ping_timeout)
        self._loop: Optional[IOLoop] = None
        self._thread: Optional[int] = None
        self._ws_params: Any = None  # Tornado's WebSocket parameters, shared by all connections

    def _announce_presence(self, kind: str, group: str, user_id: Any, version: Any = None) -> None:
        """A cluster-wide presence event: through the broker, in order with the page's messages
        (``data``: its presence version ``[epoch, n]`` as JSON, see Presence.event)."""
        self._publish_now(Envelope(PRESENCE, kind, data=None if version is None else ujson.dumps(list(version)),
                                   audience=["page", group], user_ids=[user_id]))

    def _lost_envelopes(self) -> int:
        """The broker lost envelopes it cannot replay (a gap): every page's history may miss
        them, so every epoch ends (a ``since`` from before answers ``recovered: false``), and every
        page subscription is dropped so that clients resubscribe and refetch."""
        if self.history is not None:
            self.history.forget_all()
        return self.router.drop_all_pages()

    @property
    def authenticator(self) -> Optional[Authenticator]:
        """The authenticator (token -> principal, user id or None; sync or async)."""
        return self.hooks.authenticator

    @authenticator.setter
    def authenticator(self, value: Optional[Authenticator]) -> None:
        self.hooks.authenticator = value

    @property
    def _closing(self) -> bool:
        """Shutdown has begun: upgrades are refused, no new session opens."""
        return self.sessions.closing

    @property
    def directory(self) -> Optional[Directory]:
        """The in-memory directory, when the server uses one (the default)."""
        return self.policy if isinstance(self.policy, Directory) else None

    # --- wiring ---------------------------------------------------------------------------------
    def routes(self, mount: str = "") -> list:
        """Tornado URL rules for the WebSocket endpoint, optionally under ``mount`` (e.g. "/rt")."""
        path = mount.rstrip("/") + self.settings.path_prefix
        return [(path.rstrip("/") + "/?", self.handler_class, {"server": self})]

    def make_app(self, extra_routes: Sequence = (), *, application_class: Type[Application] = Application,
                 **app_settings: Any) -> Application:
        """A Tornado Application serving the endpoint (plus ``extra_routes``); ``application_class``:
        an ``Application`` subclass to build (the HTTP server API's)."""
        return application_class(list(extra_routes) + self.routes(), **app_settings)

    async def start(self) -> None:
        """Bind to the running IOLoop and start the broker. Call once, on the loop."""
        self._bind()
        await self.broker.start()
        await self.presence.store.start()
        history_start = getattr(self.history, "start", None)
        if history_start is not None:
            await history_start()

    def _bind(self) -> None:
        if self._loop is not None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("tornado-rt is not bound to an IOLoop yet: await server.start() on "
                               "the loop (or accept a connection) before publishing from other threads") from None
        self._loop = IOLoop.current()
        self._thread = threading.get_ident()
        self.hub.bind(running.call_soon)
        self.heartbeat.start()

    def _connected(self, session: Session) -> None:
        self._bind()
        self.counters.connections_opened += 1

    def _disconnected(self, session: Session) -> None:
        closed_by = session.closed_by
        self.counters.closed[CLOSE_REASONS.get(closed_by, str(closed_by))] += 1

    def _auth_failed(self) -> None:
        self.counters.auth_failures += 1

    # --- publishing -----------------------------------------------------------------------------
    def publish(self, message: Mapping[str, Any], to: Optional[Mapping[str, Any]] = None, *,
                ignore_web_socket_id: Optional[str] = None,
                exclude_user_ids: Optional[Iterable[Any]] = None, id: Optional[str] = None) -> None:
        """Publish one message to its type's default audience, or to ``to``.

        ``to`` is one of ``{"page": NAME, ...params}``, ``{"workspace_id": ID}``,
        ``{"workspace_ids": [...]}``, ``{"user_ids": [...]}``, ``{"all_users": True}``.
        ``ignore_web_socket_id`` skips that one connection; ``exclude_user_ids`` skips every
        connection of those users. ``id`` (1-128 visible ASCII characters): an idempotency key,
        delivered at most once per process within ``Settings.dedup_window``. Raises
        :class:`~tornado_rt.PublishError` (naming the type and the key) before anything is sent.
        Safe from any thread; fire-and-forget.
        """
        self._submit(message_envelope(self.registry, message, to, ignore_web_socket_id, exclude_user_ids, id=id))

    def publish_individual(self, payloads: Mapping[Any, Mapping[str, Any]], *,
                           ignore_web_socket_id: Optional[str] = None, id: Optional[str] = None) -> None:
        """Send each user its own message: ``{user_id: message}``; ``id`` as in :meth:`publish`."""
        self._submit(individual_envelope(self.registry, payloads, ignore_web_socket_id, id=id))

    def disconnect(self, user_ids: Iterable[Any], ignore_web_socket_ids: Iterable[str] = ()) -> int:
        """Force-disconnect (4003) every connection of these users except the listed ones.

        Returns how many connections of this process it closes (0 when called off-loop)."""
        env = self._disconnect_envelope(user_ids, ignore_web_socket_ids)
        count = self._local_count(env) if self._on_loop() else 0
        self._submit(env)
        return count

    def revoke(self, user_ids: Iterable[Any], permission_group: str) -> int:
        """Drop these users' pages in ``permission_group`` with ``page_discard`` (docs/protocol.md §4).

        Returns how many pages of this process it drops (0 when called off-loop)."""
        env = self._revoke_envelope(user_ids, permission_group)
        count = self._local_count(env) if self._on_loop() else 0
        self._submit(env)
        return count

    async def disconnect_async(self, user_ids: Iterable[Any], ignore_web_socket_ids: Iterable[str] = ()) -> int:
        """Like :meth:`disconnect`, awaited on the loop: returns the count once this process's
        connections are closed; raises ``BrokerUnavailable`` if the broker is down."""
        return await self._submit_counted(self._disconnect_envelope(user_ids, ignore_web_socket_ids))

    async def revoke_async(self, user_ids: Iterable[Any], permission_group: str) -> int:
        """Like :meth:`revoke`, awaited on the loop: returns the count once this process's pages
        are dropped; raises ``BrokerUnavailable`` if the broker is down."""
        return await self._submit_counted(self._revoke_envelope(user_ids, permission_group))

    @staticmethod
    def _disconnect_envelope(user_ids: Iterable[Any], ignore_web_socket_ids: Iterable[str]) -> Envelope:
        users = id_list(list(user_ids), "user_ids", None)
        spared = [w for w in ignore_web_socket_ids if isinstance(w, str)]
        return Envelope(DISCONNECT, user_ids=users, ignore=spared)

    @staticmethod
    def _revoke_envelope(user_ids: Iterable[Any], permission_group: str) -> Envelope:
        users = id_list(list(user_ids), "user_ids", None)
        if not isinstance(permission_group, str) or not permission_group:
            raise PublishError("permission_group must be a non-empty string", "permission_group")
        return Envelope(REVOKE, user_ids=users, permission_group=permission_group)

    def _local_count(self, env: Envelope) -> int:
        """Connections (disconnect) or pages (revoke) of this process that ``env`` acts on."""
        conns = self.hub.user_connections(env.user_ids or ())
        if env.kind == DISCONNECT:
            return sum(1 for c in conns if c.web_socket_id not in env.ignore)
        assert env.permission_group is not None, "a revoke envelope names its permission group"
        return len(self.hub.permission_subscriptions(env.permission_group, conns))

    async def _submit_counted(self, env: Envelope) -> int:
        self._bind()
        count = self._local_count(env)
        await self.submit([env])
        return count

    async def publish_async(self, message: Mapping[str, Any], to: Optional[Mapping[str, Any]] = None, *,
                            ignore_web_socket_id: Optional[str] = None,
                            exclude_user_ids: Optional[Iterable[Any]] = None, id: Optional[str] = None) -> int:
        """Like :meth:`publish`, awaited on the loop: returns once the broker took the message and
        this process's connections have it queued; raises ``BrokerUnavailable`` if the broker is down.

        Returns how many connections *of this process* were handed the message (the sender's
        connection skipped by ``ignore_web_socket_id`` and excluded users not counted; with a
        multi-process broker, the other processes' connections are not counted)."""
        return await self.submit([message_envelope(self.registry, message, to, ignore_web_socket_id,
                                                   exclude_user_ids, id=id)])

    async def change_directory(self, operation: str, *args: Any) -> None:
        """Change the in-memory directory of EVERY process: ``operation`` is the name of a
        :class:`~tornado_rt.Directory` method (``load``, ``set_workspace``, ``add_member``,
        ``remove_member``, ``remove_user``, ``remove_workspace``, ``set_table``, ``remove_table``,
        ``set_public_view``, ``remove_public_view``, ``clear``) with its arguments. The change
        travels through the broker like a publish, so every process applies it at the same place
        in the order of events (with the Redis broker: on every process of the cluster); returns
        once this process applied it. Raises ``DirectoryError`` (naming the field) before anything
        is sent, ``BrokerUnavailable`` when the broker cannot take it. Calling the directory's
        methods directly changes this process only."""
        await self.submit([directory_envelope(operation, args)])

    def slicer(self) -> Slicer:
        """A :class:`Slicer` with this server's ``publish_slice`` / ``publish_slice_seconds``."""
        return Slicer(self.publish_slice, self.publish_slice_seconds)

    async def submit(self, envelopes: Sequence[Envelope]) -> int:
        """Hand prepared envelopes to the broker in order and wait for local delivery (on the loop).

        Returns the number of connections of this process the messages were handed to (summed
        over the envelopes; see :meth:`publish_async`).

        A long list is handed over in slices (see the class docstring) with a loop iteration
        between them: its envelopes keep their order, but publishes from elsewhere (another
        request, ``publish()``) may be delivered between two slices."""
        self._bind()
        slicer = self.slicer()
        publish = self.broker.publish
        waiting = []  # all handed over first (in slices): the broker keeps their order and bounds each wait
        for env in envelopes:
            self._count(env)
            result = publish(env)
            if result is not None and _awaitable(result):
                waiting.append(result)
            if slicer.due():
                await slicer.pause()
        for result in waiting:
            await result
        await self.router.wait_idle()
        delivered = 0
        for env in envelopes:  # final once the router is idle; 100,000 of them: a few ms, sliced too
            delivered += env.delivered
            if slicer.due():
                await slicer.pause()
        return delivered

    def submit_now(self, envelopes: Sequence[Envelope]) -> "Union[int, Awaitable[int]]":
        """:meth:`submit` of a short list (at most ``publish_slice`` envelopes: no slicing), done
        without a coroutine when it can be: the delivered count when the broker took every
        envelope at once and the router delivered them (the in-process broker, no async hook),
        else an awaitable of it. Raises ``BrokerUnavailable`` as :meth:`submit` does. On the loop."""
        self._bind()
        count = self._count
        batch = getattr(self.broker, "publish_batch", None) if len(envelopes) > 1 else None
        if batch is not None:
            # One future for the whole batch (RedisBroker): no future, await and completion
            # per envelope; the same order, deadlines and failure as publish() of each.
            try:
                done = batch(envelopes)
            except BaseException:
                count(envelopes[0])  # as publish() of each: the first one counted, then refused
                raise
            for env in envelopes:
                count(env)
            return self._submitted(envelopes, [done])
        publish = self.broker.publish
        waiting: Optional[List[Any]] = None
        for env in envelopes:
            count(env)
            result = publish(env)
            if result is not None and _awaitable(result):
                if waiting is None:
                    waiting = []
                waiting.append(result)
        if waiting is None and not self.router.busy:
            return sum([env.delivered for env in envelopes])
        return self._submitted(envelopes, waiting or [])

    async def _submitted(self, envelopes: Sequence[Envelope], waiting: List[Any]) -> int:
        for result in waiting:
            await result
        await self.router.wait_idle()
        return sum([env.delivered for env in envelopes])

    def _on_loop(self) -> bool:
        return self._thread is not None and threading.get_ident() == self._thread

    def _submit(self, env: Envelope) -> None:
        if self._loop is None:
            self._bind()
        if threading.get_ident() == self._thread:
            self._publish_now(env)
        else:
            loop = self._loop
            assert loop is not None  # _bind() set it or raised
            loop.add_callback(self._publish_now, env)

    def _count(self, env: Envelope) -> None:
        if env.kind == MESSAGE:
            self.counters.published[env.type] += 1
        elif env.kind == INDIVIDUAL:
            for _, name, _ in env.payloads or ():
                self.counters.published[name] += 1

    def _publish_now(self, env: Envelope) -> None:
        self._count(env)
        try:
            result = self.broker.publish(env)
        except BrokerUnavailable as exc:
            log.error("publish of %r failed: %s", env, exc)
            return
        except Exception:
            log.exception("publish of %r failed", env)
            return
        if result is not None and inspect.isawaitable(result):
            future = asyncio.ensure_future(result)
            future.add_done_callback(_log_failure)

    # --- introspection and shutdown ---------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """Numbers for ``GET /api/stats`` and the metrics endpoint."""
        hub = self.hub
        return {
            "connections": len(hub.connections),
            "authenticated_users": len(hub.users),
            "anonymous_connections": hub.anonymous,
            "pages": len(hub.groups),
            "subscriptions": hub.subscriptions,
            "messages_published": sum(self.counters.published.values()),
            "messages_delivered": sum(self.counters.delivered.values()),
            **({"redis": self.broker.routing_stats()} if hasattr(self.broker, "routing_stats") else {}),
        }

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Close every connection with 1001 after flushing what was already published, wait (at
        most ``timeout`` seconds) for their TCP connections to end, then stop the broker. Call on
        the loop. From the start of the call on, new upgrades are refused with HTTP 503.

        A connection whose backlog has not drained after half of ``timeout`` has it discarded
        (the frame in progress is finished, the frames after it dropped) so that its 1001 close
        frame still goes out right after a whole frame."""
        self.sessions.closing = True  # from now on upgrades get HTTP 503
        self.heartbeat.stop()
        await self.router.wait_idle()
        self.hub.flush()
        closing = list(self.hub.connections.values())
        for conn in closing:
            self.hub.close(conn, closecodes.GOING_AWAY, "server shutting down")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        drained_by: Optional[float] = loop.time() + timeout / 2
        while closing and loop.time() < deadline:
            await asyncio.sleep(0.01)
            closing = [c for c in closing if not getattr(c, "disconnected", True)]
            if drained_by is not None and loop.time() >= drained_by:
                drained_by = None
                self._discard_backlogs(closing, timeout / 2)
        await self.presence.store.close()
        history_close = getattr(self.history, "close", None)
        if history_close is not None:
            await history_close()
        await self.broker.close()

    @staticmethod
    def _discard_backlogs(closing: List[Any], waited: float) -> None:
        conns = dropped = 0
        for conn in closing:
            transport = getattr(conn, "transport", None)
            n = transport.discard_backlog() if transport is not None else None
            if n:
                conns += 1
                dropped += n
        if conns:
            log.info("shutdown: %d connection(s) had not read their backlog after %.1f s; %d bytes "
                     "discarded so the close frame (1001) goes out", conns, waited, dropped)


def _log_failure(future: "asyncio.Future") -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("publish failed: %s", future.exception())  # one line: no traceback per publish
