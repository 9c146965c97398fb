"""The event bus: how an envelope published in one place reaches the router of every process.

:class:`Broker` is the interface; :class:`LocalBroker` (the default) delivers inside this process
with no infrastructure at all. A multi-process broker (Redis Streams, see ``redis_broker``)
implements the same methods, so the publish API, the plugins and the connection code never change.

Contract:

* ``attach(deliver)`` is called once when the server is built: ``deliver(envelope)`` is the
  router's entry point and must be called on the IOLoop thread, in publish order.
* ``configure(settings, on_gap)`` is called once when the server is built, after ``attach``:
  the idempotency window comes from ``settings.dedup_window`` / ``settings.dedup_max_ids``;
  ``on_gap()`` is what the broker calls when it knows it lost envelopes it cannot replay (it drops
  every page subscription of this process with ``page_discard``, so clients resubscribe and
  refetch). A broker that is never configured deduplicates with the default window.
* ``start()`` is awaited on the IOLoop before the first publish when the broker needs to connect
  (the local broker needs nothing: it works without it).
* ``publish(envelope)`` is called on the IOLoop thread. It may deliver synchronously (local) or
  return an awaitable that completes once the envelope is accepted by the bus; it raises
  :class:`BrokerUnavailable` (or the awaitable does) when the bus cannot take it.
* ``close()`` is awaited at shutdown.

Idempotency: an envelope with an ``id`` is delivered at most once per process within the window
(:class:`RecentIds`); a duplicate is dropped and counted in ``duplicates``.
"""
from __future__ import annotations

import collections
import time
from typing import Any, Awaitable, Callable, Optional

from .envelope import Envelope
from .settings import default

Deliver = Callable[[Envelope], None]
OnGap = Callable[[], Any]

#: Defaults of the idempotency window (``Settings.dedup_window`` / ``Settings.dedup_max_ids``).
DEDUP_WINDOW: float = default("dedup_window")
DEDUP_MAX_IDS: int = default("dedup_max_ids")


class BrokerUnavailable(RuntimeError):
    """The broker cannot accept a publish right now (e.g. Redis is down)."""


class RecentIds:
    """The envelope ids delivered recently: at most ``max_ids`` of them, none older than
    ``window`` seconds (whichever limit is reached first evicts the oldest). ``window`` 0
    disables deduplication."""

    __slots__ = ("window", "max_ids", "_ids")

    def __init__(self, window: float = DEDUP_WINDOW, max_ids: int = DEDUP_MAX_IDS):
        self.window = window
        self.max_ids = max_ids
        self._ids: "collections.OrderedDict[str, float]" = collections.OrderedDict()

    def seen(self, key: str, now: float) -> bool:
        """Whether ``key`` was delivered within the window; remembers it (at ``now``) when not."""
        if self.window <= 0:
            return False
        ids = self._ids
        horizon = now - self.window
        while ids:
            oldest, at = next(iter(ids.items()))
            if at > horizon:
                break
            ids.popitem(last=False)
        if key in ids:
            return True
        if len(ids) >= self.max_ids:
            ids.popitem(last=False)
        ids[key] = now
        return False

    def __len__(self) -> int:
        return len(self._ids)


class Broker:
    """Interface of an event bus. See the module docstring for the contract."""

    #: The router's entry point, once :meth:`attach` was called.
    _deliver: Optional[Deliver] = None
    #: Called when envelopes were lost for good (see the module docstring); None: nothing to do.
    on_gap: Optional[OnGap] = None
    #: Envelopes dropped because their id was delivered within the window.
    duplicates = 0

    def attach(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def configure(self, settings: Any, on_gap: Optional[OnGap] = None) -> None:
        """Take the idempotency window from ``settings`` and the gap handler (see above)."""
        self.recent = RecentIds(getattr(settings, "dedup_window", DEDUP_WINDOW),
                                getattr(settings, "dedup_max_ids", DEDUP_MAX_IDS))
        self.on_gap = on_gap

    @property
    def recent(self) -> RecentIds:
        recent = self.__dict__.get("recent")
        if recent is None:
            recent = self.__dict__["recent"] = RecentIds()
        return recent

    @recent.setter
    def recent(self, value: RecentIds) -> None:
        self.__dict__["recent"] = value

    async def start(self) -> None:
        return None

    def publish(self, envelope: Envelope) -> Optional[Awaitable[Any]]:
        raise NotImplementedError

    async def close(self) -> None:
        return None

    def history_store(self, size: int, ttl: float, live: Callable[[], Any] = tuple) -> Any:
        """The recovery extension's store (a :class:`~tornado_rt.history.HistoryStore`) when the
        bus numbers page messages cluster-wide, else None (each process keeps its own).
        ``live()``: the page groups this process has connections with positions on."""
        return None

    def presence_store(self, ttl: float) -> Any:
        """The store of cluster-wide presence (a :class:`~tornado_rt.presence.PresenceStore`) when
        the bus spans processes, else None (presence counts this process). ``ttl``: seconds the
        presence of a process that died without cleaning up stays visible."""
        return None


class LocalBroker(Broker):
    """In-process bus: ``publish`` hands the envelope straight to this process's router (once
    per id within the window)."""

    def publish(self, envelope: Envelope) -> None:
        if self._deliver is None:
            raise BrokerUnavailable("the broker is not attached to a server")
        if envelope.id is not None and self.recent.seen(envelope.id, time.monotonic()):
            self.duplicates += 1
            return
        self._deliver(envelope)
