"""Settings: every limit and switch of tornado-rt, with its documented default.

Settings are passed to :class:`tornado_rt.RealtimeServer`, never read from globals. Each field is
documented here and in the README's settings table; a refusal caused by a limit always has a
documented close code (see :mod:`tornado_rt.closecodes`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

#: Algorithms the default JWT authenticator may be configured to accept. ``none`` is never one.
SUPPORTED_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA")


@dataclasses.dataclass
class Settings:
    """Configuration of one :class:`~tornado_rt.RealtimeServer`.

    Authentication
        ``jwt_secret`` (HS* key) or ``jwt_public_key`` (PEM for RS*/ES*/EdDSA); ``jwt_algorithms``
        (allow-list, default ``("HS256",)``); ``jwt_user_claim`` (default ``"user_id"``);
        ``jwt_leeway`` seconds (default 0); ``jwt_audience`` / ``jwt_issuer`` (checked when set);
        ``allow_anonymous`` (default True: the token ``anonymous`` connects without a user).
        ``max_token_length`` (default 8192 bytes): longer tokens are refused without decoding.

    Endpoint
        ``path_prefix`` (default ``"/ws/core/"``); ``allowed_origins``: ``None`` (default) allows
        only the same host, ``["*"]`` allows any Origin, otherwise the exact list of origins.

    Limits (close codes in :mod:`tornado_rt.closecodes`)
        ``max_message_size`` bytes of one incoming message (default 65536; over it: close 1009).
        ``max_subscriptions`` pages per connection (default 1000; over it: close 4008).
        ``max_incoming_rate`` messages per second per connection, token bucket with
        ``max_incoming_burst`` (defaults 50/s, burst 200; over it: close 4008).
        ``max_connections`` in this process (default 0 = unlimited; over it: HTTP 503).
        ``max_connections_per_user`` (default 0 = unlimited; over it: close 1013).
        ``max_outgoing_buffer`` bytes queued for one connection that it has not read yet
        (default 8 MiB; over it the slow consumer is closed with 4009, the others are unaffected).
        ``ping_interval`` seconds between server pings (default 25; 0 disables) and
        ``ping_timeout`` seconds to wait for the pong (default 20); a silent peer is dropped at
        once and its subscriptions released.

    HTTP and TCP (used by :class:`~tornado_rt.listener.GuardedHTTPServer`, which ``tornado-rt
    serve`` runs; an embedding program passes these settings to it or to
    :func:`~tornado_rt.listen`)
        ``header_timeout`` seconds from the accept until the first request head is complete
        (default 10; then the connection is closed: a slowloris is cut off).
        ``idle_timeout`` seconds a keep-alive HTTP connection may wait for its next request, head
        included (default 60).
        ``body_timeout`` seconds to receive a request body (default 60).
        ``max_unauthenticated_per_address`` TCP connections per peer address that are neither
        upgraded to a WebSocket nor authenticated with an API key (default 0 = unlimited; over
        it the connection is closed at once). Behind a reverse proxy every client has the
        proxy's address: set the limit in the proxy instead.
    """

    jwt_secret: Optional[str] = None
    jwt_public_key: Optional[str] = None
    jwt_algorithms: Sequence[str] = ("HS256",)
    jwt_user_claim: str = "user_id"
    jwt_leeway: float = 0.0
    jwt_audience: Optional[str] = None
    jwt_issuer: Optional[str] = None
    allow_anonymous: bool = True
    max_token_length: int = 8192

    path_prefix: str = "/ws/core/"
    allowed_origins: Optional[Sequence[str]] = None

    max_message_size: int = 64 * 1024
    max_subscriptions: int = 1000
    max_incoming_rate: float = 50.0
    max_incoming_burst: int = 200
    max_connections: int = 0
    max_connections_per_user: int = 0
    max_outgoing_buffer: int = 8 * 1024 * 1024
    ping_interval: float = 25.0
    ping_timeout: float = 20.0

    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    body_timeout: float = 60.0
    max_unauthenticated_per_address: int = 0

    def __post_init__(self) -> None:
        self.jwt_algorithms = tuple(self.jwt_algorithms)
        for alg in self.jwt_algorithms:
            if alg not in SUPPORTED_ALGORITHMS:
                raise ValueError(f"jwt_algorithms: unsupported algorithm {alg!r}; "
                                 f"choose from {', '.join(SUPPORTED_ALGORITHMS)}")
        if not self.path_prefix.startswith("/") or not self.path_prefix.endswith("/"):
            raise ValueError("path_prefix must start and end with '/'")
        if self.ping_interval and self.ping_timeout > self.ping_interval:
            raise ValueError("ping_timeout cannot be longer than ping_interval")
        for name in ("max_message_size", "max_subscriptions", "max_outgoing_buffer", "max_token_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("header_timeout", "idle_timeout", "body_timeout"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds")
        if self.max_unauthenticated_per_address < 0:
            raise ValueError("max_unauthenticated_per_address must be 0 (unlimited) or positive")

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)
