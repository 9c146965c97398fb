"""tornado-rt: a Baserow-compatible real-time WebSocket server on Tornado.

Public API (everything else is internal and may change):

Server
    :class:`RealtimeServer` — wire it into a Tornado app (``routes()`` / ``make_app()``), then
    ``publish()`` / ``publish_individual()`` / ``disconnect()`` / ``revoke()`` from any thread,
    ``publish_async()`` on the loop, ``shutdown()`` to close every connection with 1001.
    :class:`Settings` — every limit and switch, with documented defaults (declared once in
    :mod:`tornado_rt.settings`, which the command line and the README table derive from).
    :func:`web_socket_id_from_request` — the ``WebSocketId`` header of a REST call.
    :func:`tune_gc` — garbage-collector settings for a long-running server process.
    :class:`GuardedHTTPServer`, :func:`listen` — the HTTP server to run it on: header, idle and
    body timeouts, no body where none is taken, a per-address cap, and an accept loop that
    survives running out of file descriptors; :func:`mark_authenticated`, :func:`raise_fd_limit`.
Plugins
    :class:`Plugin`, :class:`PageType`, :class:`MessageType`, :class:`Registry`;
    :data:`ENTRY_POINT_GROUP` (``"tornado_rt.plugins"``); :func:`load_types` /
    :func:`load_types_file` turn ``[[page_types]]`` / ``[[message_types]]`` declarations (a dict
    or a TOML file) into a plugin, :class:`TypesConfigError` names the file, entry and key.
Access and identity
    :class:`AccessPolicy` (implement it over your database), :class:`Directory` (the default,
    in memory; ``Directory(store=FileDirectoryStore(path))`` survives restarts, see
    :class:`DirectoryStore`), :class:`Principal`, :func:`normalize_id`, :class:`JWTAuthenticator`,
    :class:`AccessWebhook` (the backend decides subscriptions: ``page_check(page)`` is a ``can_add``).
    ``tornado_rt.refusals.Denied(reason, **context)`` — what an access check may return instead of
    ``False``: falsy, and its reason (and context, never a credential) is logged and counted.
    :class:`ClientAction` — a request a plugin adds to the protocol (a frame ``{name: PAGE, ...}``,
    e.g. presence), handed to the plugin's handler on the IOLoop thread.
Event bus
    :class:`Broker` (interface), :class:`LocalBroker` (default, in-process),
    ``RedisBroker`` (several processes over one Redis Stream; needs ``pip install tornado-rt[redis]``;
    imported on first access, or ``from tornado_rt.redis_broker import RedisBroker``);
    ``PartitionedRedisBroker`` (the page groups over several Redis instances, the same way, or
    ``from tornado_rt.redis_partitions import PartitionedRedisBroker``).
    ``tornado_rt.redis_broker.RedisPublisher`` / ``AsyncRedisPublisher`` — publish from a process
    that is not a server (a Celery worker, a Django or FastAPI view) straight into the servers'
    Redis stream, validated with the same registry (same extra).
Clients (:mod:`tornado_rt.client`)
    ``Publisher`` (synchronous, standard library only) and ``AsyncPublisher`` (asyncio) — publish,
    disconnect and revoke through the HTTP server API with an API key, retrying only what cannot
    publish twice; ``Subscriber`` — a WebSocket client that subscribes to pages and reconnects
    with backoff (needs ``pip install 'tornado-rt[client]'``).
Errors
    :class:`FieldError` — base of every refusal that names the offending value in ``field``:
    :class:`PublishError` (also names the message type), ``tornado_rt.policy.DirectoryError``,
    ``tornado_rt.settings.SettingError`` (the last three are also ``ValueError``).
    :class:`BrokerUnavailable`.
Close codes
    :mod:`tornado_rt.closecodes`.
"""
from typing import Any

from . import closecodes
from .auth import JWTAuthenticator
from .broker import Broker, BrokerUnavailable, LocalBroker
from .directory_store import DirectoryStore, FileDirectoryStore
from .envelope import PublishError
from .errors import FieldError
from .listener import GuardedHTTPServer, listen, mark_authenticated, raise_fd_limit
from .policy import AccessPolicy, Directory
from .principal import Principal, normalize_id
from .registry import ENTRY_POINT_GROUP, ClientAction, MessageType, PageType, Plugin, Registry
from .server import RealtimeServer, tune_gc, web_socket_id_from_request
from .settings import Settings
from .typesconfig import TypesConfigError, load_types, load_types_file
from .webhook import AccessWebhook

__version__ = "0.1.0"

__all__ = [
    "AccessPolicy", "AccessWebhook", "Broker", "BrokerUnavailable", "Directory", "DirectoryStore",
    "ClientAction", "ENTRY_POINT_GROUP", "FieldError", "FileDirectoryStore", "GuardedHTTPServer", "JWTAuthenticator",
    "LocalBroker", "MessageType", "PageType", "Plugin", "Principal", "PublishError", "RealtimeServer", "Registry",
    "Settings", "TypesConfigError", "closecodes", "listen", "load_types", "load_types_file", "mark_authenticated",
    "normalize_id", "raise_fd_limit", "tune_gc", "web_socket_id_from_request",
]


def __getattr__(name: str) -> Any:
    """``tornado_rt.RedisBroker`` (and ``PartitionedRedisBroker``) is imported on first use only,
    so that tornado-rt never needs the optional ``redis`` package unless the Redis broker is used
    (not in ``__all__`` for the same reason)."""
    if name == "RedisBroker":
        from .redis_broker import RedisBroker
        return RedisBroker
    if name == "PartitionedRedisBroker":
        from .redis_partitions import PartitionedRedisBroker
        return PartitionedRedisBroker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
