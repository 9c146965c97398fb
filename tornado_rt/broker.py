"""The event bus: how an envelope published in one place reaches the router of every process.

:class:`Broker` is the interface; :class:`LocalBroker` (the default) delivers inside this process
with no infrastructure at all. A multi-process broker (Redis pub/sub) implements the same three
methods, so the publish API, the plugins and the connection code never change.

Contract:

* ``attach(deliver)`` is called once when the server is built: ``deliver(envelope)`` is the
  router's entry point and must be called on the IOLoop thread, in publish order.
* ``start()`` is awaited on the IOLoop before the first publish when the broker needs to connect
  (the local broker needs nothing: it works without it).
* ``publish(envelope)`` is called on the IOLoop thread. It may deliver synchronously (local) or
  return an awaitable that completes once the envelope is accepted by the bus; it raises
  :class:`BrokerUnavailable` (or the awaitable does) when the bus cannot take it.
* ``close()`` is awaited at shutdown.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

from .envelope import Envelope

Deliver = Callable[[Envelope], None]


class BrokerUnavailable(RuntimeError):
    """The broker cannot accept a publish right now (e.g. Redis is down)."""


class Broker:
    """Interface of an event bus. See the module docstring for the contract."""

    #: The router's entry point, once :meth:`attach` was called.
    _deliver: Optional[Deliver] = None

    def attach(self, deliver: Deliver) -> None:
        self._deliver = deliver

    async def start(self) -> None:
        return None

    def publish(self, envelope: Envelope) -> Optional[Awaitable[Any]]:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class LocalBroker(Broker):
    """In-process bus: ``publish`` hands the envelope straight to this process's router."""

    def publish(self, envelope: Envelope) -> None:
        if self._deliver is None:
            raise BrokerUnavailable("the broker is not attached to a server")
        self._deliver(envelope)
