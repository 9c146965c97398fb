"""Settings: every limit and switch of tornado-rt, declared once.

Each setting is ONE field declaration, ``name: type = setting(default, help, ...)``, in one of two
classes:

* :class:`Settings` — a setting of the server itself, passed to
  :class:`tornado_rt.RealtimeServer` (never read from globals);
* :class:`Standalone` — an option of ``tornado-rt serve`` only (listen address, API keys, broker,
  log level, config file, ...), which an embedding application sets up in its own way.

Everything else is derived from that declaration: the keyword argument of ``Settings(...)`` with
its default and validation; the ``tornado-rt serve`` option (``--max-message-size``), its
environment variable (``TORNADO_RT_MAX_MESSAGE_SIZE``), its TOML key (``max_message_size``) and
its ``--help`` line; and the row of the README's settings table
(``tornado-rt settings --markdown``; a test keeps the README equal to it).

**Adding a setting** is one field with :func:`setting` in :class:`Settings` (or
:class:`Standalone`), then ``tornado-rt settings --write-readme README.md``. ``setting``
takes the default, the help text (say what happens above a limit: the close code or HTTP status),
a ``check`` (the validation, see :func:`at_least`, :func:`number_at_least`, :func:`choice` ...; by
default only the type is checked, inferred from the default), the ``metavar`` of the option, its
``group`` in ``--help`` (``server``, ``auth``, ``limits``) and, rarely, a different ``flag``/``key``.

Validation is the same from Python and from the command line: a value given as text (command line,
environment) or TOML is first converted to the field's type, then the field's ``check`` runs; a
refusal is a :class:`SettingError` (a ``ValueError``) whose ``field`` is the setting's name. A
limit refused from the command line gives exit code 2 and names the option
(:mod:`tornado_rt.cli`); a refusal caused by a limit at run time has a documented close code
(:mod:`tornado_rt.closecodes`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from .errors import FieldError
from .proxy import parse_networks
from .redaction import redact_url

__all__ = ["SUPPORTED_ALGORITHMS", "HMAC_ALGORITHMS", "LOG_LEVELS", "Option", "SettingError", "Settings",
           "Standalone", "OPTIONS", "setting", "markdown_table", "write_readme"]

#: Algorithms the default JWT authenticator may be configured to accept. ``none`` is never one.
SUPPORTED_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA")
#: The HMAC ones: they take ``jwt_secret``; the others take ``jwt_public_key``.
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: Values of ``--broker`` that mean the in-process event bus.
IN_PROCESS = ("in-process", "local", "memory")

_OPTION = "tornado_rt.option"


class SettingError(FieldError, ValueError):
    """A setting's value was refused; ``field`` is the setting's name."""


# --- conversion from text / TOML (command line, environment, config file) ---------------------------

def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"must be an integer, got {value!r}")
    try:
        return int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(f"must be an integer, got {value!r}") from None


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"must be a number, got {value!r}") from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"must be true or false (1/0, yes/no), got {value!r}")


def _to_list(value: Any) -> List[str]:
    """A list: a comma-separated string, a TOML array, or repeated command-line options."""
    if isinstance(value, str):
        parts = [p for p in (s.strip() for s in value.split(",")) if p]
    elif isinstance(value, list):
        parts = value
    else:
        raise ValueError(f"must be a list, got {value!r}")
    if not parts:
        raise ValueError("must not be empty")
    return [_text(p) for p in parts]


_CONVERTERS: Dict[str, Callable[[Any], Any]] = {
    "str": _text, "int": _to_int, "float": _to_float, "bool": _to_bool, "list": _to_list,
}


# --- checks: run on every value, from Python as from text ---------------------------------------------

Check = Callable[[Any], Any]


def _is_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def _non_empty(value: Any) -> str:
    if not _is_str(value):
        raise ValueError("must not be empty")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, got {value!r}")
    return value


def at_least(low: int, high: Optional[int] = None) -> Check:
    """An integer from ``low`` (to ``high``)."""
    def check(value: Any) -> int:
        value = _integer(value)
        if value < low or (high is not None and value > high):
            if high is not None:
                raise ValueError(f"must be from {low} to {high}, got {value}")
            raise ValueError(f"must be positive, got {value}" if low == 1 else f"must be at least {low}, got {value}")
        return value
    return check


def number_at_least(low: float) -> Check:
    """A finite number of at least ``low`` (an int is taken as a float)."""
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        if not value >= low or value == float("inf"):
            raise ValueError(f"must be a number of at least {low}, got {value!r}")
        return float(value)
    return check


def positive_number(value: Any) -> float:
    """A finite number above 0 (seconds of a timeout)."""
    value = number_at_least(0)(value)
    if value <= 0:
        raise ValueError(f"must be a positive number, got {value!r}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be True or False, got {value!r}")
    return value


def choice(names: Sequence[str]) -> Check:
    """One of ``names``, compared case-insensitively, given back as spelled in ``names``."""
    def check(value: Any) -> str:
        text = _is_str(value).strip()
        for name in names:
            if name.lower() == text.lower():
                return name
        raise ValueError(f"must be one of {', '.join(names)}, got {value!r}")
    return check


def each(item: Check) -> Check:
    """A list or tuple (kept as given) of items that pass ``item``."""
    def check(value: Any) -> Any:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a list, got {value!r}")
        return type(value)(item(v) for v in value)
    return check


def _algorithm(value: Any) -> str:
    name = _is_str(value).strip()
    for alg in SUPPORTED_ALGORITHMS:
        if alg.lower() == name.lower():
            return alg
    raise ValueError(f"unsupported algorithm {name!r}; choose from {', '.join(SUPPORTED_ALGORITHMS)}")


def _origin(value: Any) -> str:
    origin = _non_empty(value)
    if origin != "*" and "://" not in origin:
        raise ValueError(f"an origin looks like https://app.example.com (or * for any), got {origin!r}")
    return origin


def _cidr(value: Any) -> str:
    cidr = _non_empty(value).strip()
    try:
        parse_networks([cidr])
    except ValueError:
        raise ValueError(f"an address or network looks like 127.0.0.1 or 10.0.0.0/8, got {cidr!r}") from None
    return cidr


def _path_prefix(value: Any) -> str:
    prefix = _is_str(value)
    if not prefix.startswith("/") or not prefix.endswith("/"):
        raise ValueError(f"must start and end with '/', got {prefix!r}")
    return prefix


def _broker(value: Any) -> Optional[str]:
    if isinstance(value, (list, tuple)) and value and all(isinstance(url, str) for url in value):
        value = ",".join(value)  # a list in the config file: several Redis instances
    text = _non_empty(value).strip()
    if text.lower() in IN_PROCESS:
        return None
    if "," not in text:
        return _redis_url(text)
    # Several Redis instances (docs/redis.md "Partitioning over several Redis instances"): each
    # URL is checked; a comma inside one (a password) must be percent-encoded (%2C).
    urls = [_redis_url(url.strip()) for url in text.split(",")]
    if len(set(urls)) != len(urls):
        raise ValueError("the same Redis URL is listed twice: each instance holds one partition")
    return ",".join(urls)


def _redis_url(url: str) -> str:
    if not url:
        raise ValueError("an empty Redis URL in the list (URLs are separated by commas)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL {redact_url(url)!r}: {exc}") from None
    if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme != "unix" and not parts.hostname):
        raise ValueError(f"use 'in-process' or a Redis URL like redis://127.0.0.1:6379/0, got {redact_url(url)!r}")
    return url


def _http_url(value: Any) -> str:
    url = _non_empty(value).strip()
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"not a valid URL {redact_url(url)!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, got {redact_url(url)!r}")
    return url


# --- the declaration ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Option:
    """What one :func:`setting` declares (``name`` and ``scope`` are filled in from the field).

    ``key`` is the TOML key and the suffix of the environment variable (the field name unless
    given); ``kind`` is ``value``, ``list`` (a repeatable option) or ``flag`` (no value);
    ``invert``: the flag sets the field to False (``--no-anonymous`` -> ``allow_anonymous``);
    ``env``: False for a command-line-only option; ``in_file``: False for an option that is not
    a key of the config file.
    """

    default: Any
    help: str
    type: str
    check: Check
    group: str = "server"
    kind: str = "value"
    metavar: Optional[str] = None
    flag_name: Optional[str] = None
    key_name: Optional[str] = None
    invert: bool = False
    env: bool = True
    in_file: bool = True
    shown_default: Optional[str] = None
    name: str = ""
    scope: str = ""

    @property
    def key(self) -> str:
        return self.key_name or self.name

    @property
    def flag(self) -> str:
        return self.flag_name or "--" + self.key.replace("_", "-")

    @property
    def env_var(self) -> Optional[str]:
        return f"TORNADO_RT_{self.key.upper()}" if self.env else None

    @property
    def toml_key(self) -> Optional[str]:
        return self.key if self.env and self.in_file else None

    def validate(self, value: Any) -> Any:
        """Check a value given in Python (``None`` is allowed when it is the default)."""
        if value is None and self.default is None:
            return None
        return self.check(value)

    def parse(self, value: Any) -> Any:
        """Convert a value given as text or TOML, then check it. (The value of an ``invert``
        flag is the option's: True for ``--no-anonymous``.)"""
        return self.validate(_CONVERTERS[self.type](value))

    def default_text(self) -> str:
        """How ``--help`` and the README show the default ("" when there is none to show)."""
        if self.shown_default is not None:
            return self.shown_default
        if self.kind == "flag" or self.default in (None, (), []):
            return ""
        if isinstance(self.default, (list, tuple)):
            return ",".join(self.default)
        return str(self.default)


def _type_of(default: Any) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, tuple):
        return "list"
    return "str"


#: The check of a setting declared without one: its type only.
_TYPE_CHECKS: Dict[str, Check] = {
    "bool": _flag, "int": _integer, "float": number_at_least(float("-inf")), "list": each(_non_empty),
    "str": _is_str,
}


def setting(default: Any, help: str, check: Optional[Check] = None, *, type: Optional[str] = None,
            group: str = "server", kind: Optional[str] = None, metavar: Optional[str] = None,
            flag: Optional[str] = None, key: Optional[str] = None, invert: bool = False, env: bool = True,
            in_file: bool = True, shown_default: Optional[str] = None) -> Any:
    """Declare one setting (a dataclass field of :class:`Settings` or :class:`Standalone`).

    The type (``str``, ``int``, ``float``, ``bool``, ``list``) is inferred from ``default``
    unless given (a ``None`` default is a string); ``check`` validates and may normalise the value
    (default: the type only). See :class:`Option` for the rest."""
    type = type or _type_of(default)
    check = check or _TYPE_CHECKS[type]
    kind = kind or ("flag" if type == "bool" else "list" if type == "list" else "value")
    option = Option(default=default, help=help, type=type, check=check, group=group, kind=kind,
                    metavar=metavar, flag_name=flag, key_name=key, invert=invert, env=env, in_file=in_file,
                    shown_default=shown_default)
    return dataclasses.field(default=default, metadata={_OPTION: option})


def _options_of(cls: type, scope: str) -> Tuple[Option, ...]:
    return tuple(dataclasses.replace(f.metadata[_OPTION], name=f.name, scope=scope)
                 for f in dataclasses.fields(cls))


def _validate_fields(obj: Any, options: Tuple[Option, ...]) -> None:
    for option in options:
        try:
            value = option.validate(getattr(obj, option.name))
        except ValueError as exc:
            raise SettingError(f"{option.name}: {exc}", option.name) from None
        setattr(obj, option.name, value)


_BYTES = "BYTES"
_MIB = 1024 * 1024


def memory_limit() -> Optional[int]:
    """The memory this process may use, in bytes: the physical memory, or the cgroup (v2)
    limit of its container when that is lower; None when neither can be read."""
    found: Optional[int] = None
    try:
        found = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            text = f.read().strip()
        if text.isdigit():
            found = min(found, int(text)) if found else int(text)
    except OSError:
        pass
    return found if found and found > 0 else None


def default_total_outgoing_buffer() -> int:
    """The default of ``max_total_outgoing_buffer``: a quarter of :func:`memory_limit`, at
    least 64 MiB; 1 GiB when the memory cannot be read."""
    memory = memory_limit()
    if memory is None:
        return 1024 * _MIB
    return max(64 * _MIB, memory // 4)


@dataclasses.dataclass
class Settings:
    """Configuration of one :class:`~tornado_rt.RealtimeServer`: ``Settings(max_subscriptions=50)``.

    Every field, its default, its validation and its meaning are declared below (and listed in the
    README's settings table); a refused value raises :class:`SettingError` (a ``ValueError``)
    naming the field.
    """

    # Authentication
    jwt_secret: Optional[str] = setting(
        None, "shared secret of the HS* algorithms (tokens are refused when no key is set)",
        metavar="SECRET", group="auth")
    jwt_public_key: Optional[str] = setting(
        None, "public key (PEM) for RS*/ES*/EdDSA; on the command line a PEM file (the environment "
        "variable may also hold the PEM itself; a relative path in the config file is relative to it)",
        metavar="FILE", group="auth")
    jwt_algorithms: Sequence[str] = setting(
        ("HS256",), "accepted JWT algorithm (allow-list; 'none' never is; others: 4001), repeatable (env and "
        f"config: a list); one of {', '.join(SUPPORTED_ALGORITHMS)}",
        each(_algorithm), flag="--jwt-algorithm", metavar="ALG", group="auth")
    jwt_user_claim: str = setting("user_id", "claim holding the user id", _non_empty, metavar="CLAIM",
                                  group="auth")
    jwt_leeway: float = setting(0.0, "seconds of clock skew tolerated on exp/nbf", number_at_least(0),
                                metavar="SECONDS", group="auth")
    jwt_audience: Optional[str] = setting(None, "required aud claim (checked when set; else 4001)",
                                          metavar="AUD", group="auth")
    jwt_issuer: Optional[str] = setting(None, "required iss claim (checked when set; else 4001)",
                                        metavar="ISS", group="auth")
    allow_anonymous: bool = setting(
        True, "refuse the token 'anonymous' (4001; else it connects without a user); in Python: "
        "allow_anonymous=False",
        key="no_anonymous", invert=True, group="auth", shown_default="anonymous allowed")
    max_token_length: int = setting(8192, "longest token in bytes; longer ones are refused (4001) without "
                                    "decoding", at_least(1), metavar=_BYTES, group="auth")

    # Endpoint
    path_prefix: str = setting("/ws/core/", "path of the WebSocket endpoint (starts and ends with '/')",
                               _path_prefix, metavar="PATH")
    allowed_origins: Optional[Sequence[str]] = setting(
        None, "WebSocket Origin allowed, repeatable (env and config: a list); '*' allows any; another "
        "Origin gets HTTP 403 on the upgrade", each(_origin), type="list", flag="--allowed-origin",
        metavar="ORIGIN", group="auth", shown_default="same host only")
    error_frames: bool = setting(
        False, "also tell the client why a subscription was refused or a frame ignored, with "
        "{\"type\": \"error\", \"code\": ..., \"message\": ...} (a tornado-rt extension: off, the wire is "
        "exactly Baserow's; on with --dev unless set)", shown_default="off (on with --dev)")
    trusted_proxies: Sequence[str] = setting(
        (), "address or CIDR network of a reverse proxy whose X-Forwarded-For/-Proto/-Host are used (client "
        "address in logs, the Origin check; exempt from max_unauthenticated_per_address), repeatable (env and "
        "config: a list); ignored from any other peer", each(_cidr), flag="--trusted-proxy", metavar="CIDR")

    # Limits
    max_message_size: int = setting(64 * 1024, "largest incoming WebSocket message in bytes (close 1009 "
                                     "above it)", at_least(1), metavar=_BYTES, group="limits")
    max_subscriptions: int = setting(1000, "pages per connection (close 4008 above it)", at_least(1),
                                     metavar="N", group="limits")
    max_incoming_rate: float = setting(50.0, "client messages per second per connection, 0 = unlimited "
                                       "(close 4008 above it)", number_at_least(0), metavar="N", group="limits")
    max_incoming_burst: int = setting(200, "burst of the incoming rate limit", at_least(1), metavar="N",
                                      group="limits")
    max_connections: int = setting(0, "connections in this process, 0 = unlimited (HTTP 503 above it)",
                                   at_least(0), metavar="N", group="limits")
    max_connections_per_user: int = setting(0, "connections per user, 0 = unlimited (close 1013 above it)",
                                            at_least(0), metavar="N", group="limits")
    max_outgoing_buffer: int = setting(8 * 1024 * 1024, "bytes queued for a connection that does not read "
                                       "(close 4009 above it; the others are unaffected)", at_least(1),
                                       metavar=_BYTES, group="limits")
    max_total_outgoing_buffer: Optional[int] = setting(
        None, "bytes queued for all connections together that do not read fast enough; past it the "
        "connections holding the most are dropped first (close 4009) until under it; 0 = unlimited",
        at_least(0), type="int", metavar=_BYTES, group="limits", shown_default="1/4 of memory")
    ping_interval: float = setting(25.0, "seconds between server pings, 0 = none", number_at_least(0),
                                   metavar="SECONDS", group="limits")
    ping_timeout: float = setting(20.0, "seconds to wait for a pong; a silent peer is dropped at once and "
                                  "its subscriptions released (not longer than ping_interval)",
                                  number_at_least(0), metavar="SECONDS", group="limits")

    # Protocol extensions (docs/protocol.md "Extensions")
    history_size: int = setting(100, "page messages kept per page for the recovery extension (clients that "
                                "connect with positions=1 and resubscribe with since), 0 = extension off",
                                at_least(0), metavar="N")
    history_ttl: float = setting(300.0, "seconds a page message is kept for recovery", positive_number,
                                 metavar="SECONDS")
    presence_ttl: float = setting(30.0, "with the Redis broker: seconds the presence of a process that died "
                                  "without cleaning up (killed) stays visible to the others", positive_number,
                                  metavar="SECONDS")

    # HTTP and TCP (GuardedHTTPServer: `tornado-rt serve` runs it; embedders pass these to tornado_rt.listen)
    header_timeout: float = setting(10.0, "seconds from accept until the first request head is complete (the "
                                    "connection is closed after)", positive_number, metavar="SECONDS", group="limits")
    idle_timeout: float = setting(60.0, "seconds a keep-alive HTTP connection may wait for its next request",
                                  positive_number, metavar="SECONDS", group="limits")
    body_timeout: float = setting(60.0, "seconds to receive a request body", positive_number, metavar="SECONDS",
                                  group="limits")
    max_unauthenticated_per_address: int = setting(
        0, "TCP connections per client address not yet upgraded to a WebSocket nor authenticated with an "
        "API key, 0 = unlimited (closed at once above it; behind a proxy set the limit there)", at_least(0),
        metavar="N", group="limits")

    # Idempotency (envelope ids, in local and Redis mode)
    dedup_window: float = setting(300.0, "seconds during which every process delivers an envelope id at most "
                                  "once, 0 = no deduplication", number_at_least(0), metavar="SECONDS",
                                  group="limits")
    dedup_max_ids: int = setting(100_000, "envelope ids each process remembers at most (the oldest are "
                                 "forgotten first)", at_least(1), metavar="N", group="limits")

    @property
    def total_outgoing_budget(self) -> int:
        """``max_total_outgoing_buffer``, or when unset a quarter of the memory this process may
        use (see :func:`default_total_outgoing_buffer`); 0 = unlimited."""
        if self.max_total_outgoing_buffer is None:
            return default_total_outgoing_buffer()
        return self.max_total_outgoing_buffer

    def __post_init__(self) -> None:
        _validate_fields(self, SERVER_OPTIONS)
        self.jwt_algorithms = tuple(self.jwt_algorithms)
        if self.ping_interval and self.ping_timeout > self.ping_interval:
            raise SettingError("ping_timeout cannot be longer than ping_interval", "ping_timeout")

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class Standalone:
    """The options of ``tornado-rt serve`` that are not server :class:`Settings` (an embedding
    application listens, authenticates its backend and picks a broker in its own code). Only a
    declaration: :mod:`tornado_rt.cli` reads and checks these options."""

    host: str = setting("127.0.0.1", "listen address", metavar="HOST")
    port: int = setting(8000, "listen port; 0 picks a free one (the start-up line shows it)", at_least(0, 65535),
                        metavar="PORT")
    config: Optional[str] = setting(None, "TOML file with the keys of this table in snake_case; an unknown "
                                    "key is refused", metavar="FILE", in_file=False)
    api_keys: Tuple[str, ...] = setting(
        (), "key accepted by the HTTP server API as 'Authorization: Bearer KEY', repeatable (env and config: "
        "a list)", flag="--api-key", metavar="KEY", group="auth")
    jwt_private_key: Optional[str] = setting(
        None, "private key (PEM file; the environment variable may hold the PEM itself) used only by "
        "'tornado-rt token' and 'listen --user' to sign tokens for RS*/ES*/EdDSA; the server never needs it",
        metavar="FILE", group="auth")
    broker: Optional[str] = setting(
        None, "event bus: 'in-process' or a Redis URL such as redis://127.0.0.1:6379/0 (needs the redis extra); "
        "several Redis URLs separated by commas partition the page groups over those instances (the same "
        "list in the same order on every process)",
        _broker, metavar="URL", shown_default="in-process")
    redis_channel_prefix: str = setting(
        "tornado-rt", "with a Redis broker: processes with the same prefix on the same Redis form one server "
        "(the stream is PREFIX:stream)", _non_empty, metavar="PREFIX")
    redis_stream_length: int = setting(
        100_000, "with a Redis broker: envelopes the stream keeps at least, i.e. how far a stalled process may "
        "fall behind before its clients get page_discard (Redis memory: about this many times the envelope "
        "size plus 160 bytes)", at_least(1), metavar="N")
    tls_cert: Optional[str] = setting(
        None, "PEM certificate chain: serve wss:// and https:// directly, TLS 1.2+ (with --tls-key; SIGHUP "
        "reloads both; a relative path in the config file is relative to it)", metavar="FILE")
    tls_key: Optional[str] = setting(None, "PEM private key of --tls-cert (unencrypted)", metavar="FILE")
    log_level: str = setting("info", f"one of {', '.join(LOG_LEVELS)} (logs go to stderr)", choice(LOG_LEVELS),
                             metavar="LEVEL")
    no_metrics: bool = setting(False, "do not serve GET /metrics", shown_default="metrics on")
    max_body_size: int = setting(10 * 1024 * 1024, "largest HTTP request body in bytes (413 above it)",
                                 at_least(1), metavar=_BYTES, group="limits")
    types: Optional[str] = setting(
        None, "TOML file declaring [[page_types]] and [[message_types]] (the config file may hold them too; "
        "a relative path in the config file is relative to it; docs/standalone.md)", metavar="FILE")
    directory: Optional[str] = setting(
        None, "JSON file keeping the directory across restarts: loaded at start (refused with the position of "
        "an error), rewritten atomically on every change, reloaded on SIGHUP; cannot be combined with "
        "--broker redis:// (the cluster's directory is kept in Redis)", metavar="FILE")
    access_url: Optional[str] = setting(
        None, "access webhook: POST URL decides the subscriptions to pages whose access is 'webhook' (and to "
        "--access-page pages); timeouts and errors refuse", _http_url, metavar="URL", group="auth")
    access_pages: Tuple[str, ...] = setting(
        (), "registered page type (e.g. table, row, view) whose subscriptions the access webhook decides "
        "instead of its own check, repeatable (env and config: a list)", flag="--access-page", metavar="PAGE",
        group="auth")
    access_timeout: float = setting(2.0, "seconds the access webhook may take to decide (then refused)",
                                    positive_number, metavar="SECONDS", group="auth")
    access_cache_ttl: float = setting(5.0, "seconds an access webhook decision is reused, 0 = never",
                                      number_at_least(0), metavar="SECONDS", group="auth")
    access_concurrency: int = setting(16, "access webhook calls in flight at most", at_least(1), metavar="N",
                                      group="auth")
    dev: bool = setting(
        False, "development mode: generate a JWT secret and an API key when none is given and print them with "
        "a JWT for user 1, a curl publish example and a browser snippet; seed a demo directory; allow any "
        "Origin unless --allowed-origin is given. Never in production.", env=False)


SERVER_OPTIONS = _options_of(Settings, "server")
STANDALONE_OPTIONS = _options_of(Standalone, "standalone")
#: Every setting, server settings first.
OPTIONS: Tuple[Option, ...] = SERVER_OPTIONS + STANDALONE_OPTIONS


# --- the README table ---------------------------------------------------------------------------------

README_BEGIN = "<!-- settings-table:begin (generated by: tornado-rt settings --write-readme README.md) -->"
README_END = "<!-- settings-table:end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(options: Sequence[Option] = OPTIONS) -> str:
    """The README's settings table: one row per setting."""
    rows = ["| `Settings` field | command line | environment variable / TOML key | default | meaning |",
            "|---|---|---|---|---|"]
    for option in options:
        field = f"`{option.name}`" if option.scope == "server" else "(standalone only)"
        flag = f"`{option.flag} {option.metavar}`" if option.metavar else f"`{option.flag}`"
        if option.kind == "list":
            flag += " (repeatable)"
        where = []
        if option.env_var:
            where.append(f"`{option.env_var}`")
        if option.toml_key:
            where.append(f"`{option.toml_key}`")
        default = option.default_text()
        rows.append(f"| {field} | {flag} | {' / '.join(where) or 'command line only'} | "
                    f"{_cell(f'`{default}`' if default else '—')} | {_cell(option.help)} |")
    return "\n".join(rows) + "\n"


def readme_block(text: str) -> str:
    """The generated part of a README (between the markers)."""
    start = text.index(README_BEGIN) + len(README_BEGIN)
    return text[start:text.index(README_END, start)].strip("\n") + "\n"


def write_readme(path: str) -> None:
    """Replace the generated block of the README at ``path`` with :func:`markdown_table`."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    start = text.index(README_BEGIN) + len(README_BEGIN)
    end = text.index(README_END, start)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"{text[:start]}\n{markdown_table()}{text[end:]}")


def default(name: str) -> Any:
    """The declared default of the setting ``name`` (a field of :class:`Settings` or
    :class:`Standalone`): code that needs a default outside a settings object takes it from here,
    so the declaration stays the only place it is written."""
    for cls in (Settings, Standalone):
        for field in dataclasses.fields(cls):
            if field.name == name:
                return field.default
    raise KeyError(f"no setting named {name!r}")
