"""``tornado-rt serve``: the standalone server (docs/server-api.md); ``tornado-rt types``: the
message catalogue (:mod:`tornado_rt.catalogue`).

Every option has an environment variable (``TORNADO_RT_<NAME>``) and a key of the TOML config
file (the option's snake_case name, listed by ``tornado-rt serve --help``). Precedence: command
line > environment > config file > default. An empty environment variable counts as unset.

Refusals (missing key, invalid value, unreadable file, bad TOML, unusable broker URL, a port that
cannot be bound) print one line ``tornado-rt: error: <option>: <why>`` on stderr and exit with
code 2. SIGINT/SIGTERM stop accepting, close every WebSocket with 1001 and exit 0; a second
signal exits at once.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import difflib
import logging
import os
import secrets
import shlex
import signal
import socket
import sys
import textwrap
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from . import __version__
from .settings import SUPPORTED_ALGORITHMS, Settings

PROG = "tornado-rt"
ENV_CONFIG = "TORNADO_RT_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
IN_PROCESS = ("in-process", "local", "memory")
_HMAC = ("HS256", "HS384", "HS512")

log = logging.getLogger("tornado_rt.cli")


class ConfigError(Exception):
    """A refusal to start: one line naming the option."""


# --- value parsers: take a string (command line, environment) or a TOML value --------------------------

def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _int(low: int, high: Optional[int] = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"must be an integer, got {value!r}")
        try:
            number = int(value.strip()) if isinstance(value, str) else value
        except ValueError:
            raise ValueError(f"must be an integer, got {value!r}") from None
        if number < low or (high is not None and number > high):
            raise ValueError(f"must be from {low} to {high}, got {number}" if high is not None
                             else f"must be at least {low}, got {number}")
        return number
    return parse


def _float(low: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"must be a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"must be a number, got {value!r}") from None
        if not number >= low or number == float("inf"):
            raise ValueError(f"must be a number of at least {low}, got {value!r}")
        return number
    return parse


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"must be true or false (1/0, yes/no), got {value!r}")


def _list(item: Callable[[Any], Any]) -> Callable[[Any], List[Any]]:
    """A list: a comma-separated string, a TOML array, or repeated command-line options."""
    def parse(value: Any) -> List[Any]:
        if isinstance(value, str):
            parts = [p for p in (s.strip() for s in value.split(",")) if p]
        elif isinstance(value, list):
            parts = value
        else:
            raise ValueError(f"must be a list, got {value!r}")
        if not parts:
            raise ValueError("must not be empty")
        return [item(p) for p in parts]
    return parse


def _algorithm(value: Any) -> str:
    name = _text(value)
    for alg in SUPPORTED_ALGORITHMS:
        if alg.lower() == name.lower():
            return alg
    raise ValueError(f"unknown algorithm {name!r}; choose from {', '.join(SUPPORTED_ALGORITHMS)}")


def _origin(value: Any) -> str:
    origin = _text(value)
    if origin != "*" and "://" not in origin:
        raise ValueError(f"an origin looks like https://app.example.com (or * for any), got {origin!r}")
    return origin


def _log_level(value: Any) -> str:
    level = _text(value).lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


def redact_url(url: str) -> str:
    """``url`` without its password (for messages)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = f"{parts.username}:" if parts.username else ":"
        return parts._replace(netloc=f"{user}[redacted]@{netloc}").geturl()
    except ValueError:
        return "[unparsable URL]"


def _broker(value: Any) -> Optional[str]:
    url = _text(value)
    if url.lower() in IN_PROCESS:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL {redact_url(url)!r}: {exc}") from None
    if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme != "unix" and not parts.hostname):
        raise ValueError(f"use 'in-process' or a Redis URL like redis://127.0.0.1:6379/0, got {redact_url(url)!r}")
    return url


def _path_prefix(value: Any) -> str:
    prefix = _text(value)
    if not prefix.startswith("/") or not prefix.endswith("/"):
        raise ValueError(f"must start and end with '/', got {prefix!r}")
    return prefix


# --- the option table -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Option:
    """One setting of ``tornado-rt serve``: ``name`` is its TOML key and the suffix of its
    environment variable; ``kind`` is ``value``, ``list`` (repeatable) or ``flag``."""

    name: str
    flag: str
    default: Any
    parse: Callable[[Any], Any]
    help: str
    kind: str = "value"
    metavar: Optional[str] = None
    env: Optional[str] = "auto"
    group: str = "server"
    shown_default: Optional[str] = None  # how --help shows the default, when not the value itself

    @property
    def env_var(self) -> Optional[str]:
        return f"TORNADO_RT_{self.name.upper()}" if self.env == "auto" else self.env


OPTIONS: Tuple[Option, ...] = (
    Option("host", "--host", "127.0.0.1", _text, "listen address", metavar="HOST"),
    Option("port", "--port", 8000, _int(0, 65535), "listen port; 0 picks a free one (the start-up line shows it)",
           metavar="PORT"),
    Option("jwt_secret", "--jwt-secret", None, _text, "shared secret of the HS* algorithms", metavar="SECRET",
           group="auth"),
    Option("jwt_public_key", "--jwt-public-key", None, _text,
           "PEM file with the public key for RS*/ES*/EdDSA (the environment variable may also hold the PEM itself)",
           metavar="FILE", group="auth"),
    Option("jwt_algorithms", "--jwt-algorithm", ["HS256"], _list(_algorithm),
           f"accepted JWT algorithm, repeatable (env and config: a list); one of {', '.join(SUPPORTED_ALGORITHMS)}",
           kind="list", metavar="ALG", group="auth"),
    Option("jwt_user_claim", "--jwt-user-claim", "user_id", _text, "claim holding the user id", metavar="CLAIM",
           group="auth"),
    Option("jwt_leeway", "--jwt-leeway", 0.0, _float(0), "seconds of clock skew tolerated on exp/nbf",
           metavar="SECONDS", group="auth"),
    Option("jwt_audience", "--jwt-audience", None, _text, "required aud claim (checked when set)", metavar="AUD",
           group="auth"),
    Option("jwt_issuer", "--jwt-issuer", None, _text, "required iss claim (checked when set)", metavar="ISS",
           group="auth"),
    Option("no_anonymous", "--no-anonymous", False, _bool, "refuse jwt_token=anonymous", kind="flag",
           group="auth"),
    Option("api_keys", "--api-key", [], _list(_text),
           "key accepted by the HTTP server API as 'Authorization: Bearer KEY', repeatable "
           "(env and config: a list)", kind="list", metavar="KEY", group="auth"),
    Option("allowed_origins", "--allowed-origin", None, _list(_origin),
           "WebSocket Origin allowed, repeatable (env and config: a list); '*' allows any", kind="list",
           metavar="ORIGIN", group="auth", shown_default="same host only"),
    Option("broker", "--broker", None, _broker,
           "event bus: 'in-process' or a Redis URL such as redis://127.0.0.1:6379/0 (needs the redis extra)",
           metavar="URL", shown_default="in-process"),
    Option("log_level", "--log-level", "info", _log_level, f"one of {', '.join(LOG_LEVELS)}", metavar="LEVEL"),
    Option("path_prefix", "--path-prefix", "/ws/core/", _path_prefix, "path of the WebSocket endpoint",
           metavar="PATH"),
    Option("no_metrics", "--no-metrics", False, _bool, "do not serve GET /metrics", kind="flag"),
    Option("max_body_size", "--max-body-size", 10 * 1024 * 1024, _int(1),
           "largest HTTP request body in bytes (413 above it)", metavar="BYTES", group="limits"),
    Option("max_message_size", "--max-message-size", 64 * 1024, _int(1),
           "largest incoming WebSocket message in bytes (close 1009 above it)", metavar="BYTES", group="limits"),
    Option("max_subscriptions", "--max-subscriptions", 1000, _int(1),
           "pages per connection (close 4008 above it)", metavar="N", group="limits"),
    Option("max_incoming_rate", "--max-incoming-rate", 50.0, _float(0),
           "client messages per second per connection, 0 = unlimited (close 4008 above it)", metavar="N",
           group="limits"),
    Option("max_incoming_burst", "--max-incoming-burst", 200, _int(1), "burst of the incoming rate limit",
           metavar="N", group="limits"),
    Option("max_connections", "--max-connections", 0, _int(0),
           "connections in this process, 0 = unlimited (HTTP 503 above it)", metavar="N", group="limits"),
    Option("max_connections_per_user", "--max-connections-per-user", 0, _int(0),
           "connections per user, 0 = unlimited (close 1013 above it)", metavar="N", group="limits"),
    Option("max_outgoing_buffer", "--max-outgoing-buffer", 8 * 1024 * 1024, _int(1),
           "bytes queued for a connection that does not read (close 4009 above it)", metavar="BYTES",
           group="limits"),
    Option("ping_interval", "--ping-interval", 25.0, _float(0), "seconds between server pings, 0 = none",
           metavar="SECONDS", group="limits"),
    Option("ping_timeout", "--ping-timeout", 20.0, _float(0), "seconds to wait for a pong", metavar="SECONDS",
           group="limits"),
    Option("header_timeout", "--header-timeout", 10.0, _float(0),
           "seconds from accept until the first request head is complete (the connection is closed after)",
           metavar="SECONDS", group="limits"),
    Option("idle_timeout", "--idle-timeout", 60.0, _float(0),
           "seconds a keep-alive HTTP connection may wait for its next request", metavar="SECONDS", group="limits"),
    Option("body_timeout", "--body-timeout", 60.0, _float(0), "seconds to receive a request body",
           metavar="SECONDS", group="limits"),
    Option("max_unauthenticated_per_address", "--max-unauthenticated-per-address", 0, _int(0),
           "TCP connections per client address not yet upgraded to a WebSocket nor authenticated with an "
           "API key, 0 = unlimited (closed at once above it)", metavar="N", group="limits"),
    Option("dev", "--dev", False, _bool,
           "development mode: generate a JWT secret and an API key when none is given and print them with "
           "a JWT for user 1, a curl publish example and a browser snippet; seed a demo directory; "
           "allow any Origin unless --allowed-origin is given. Never in production.",
           kind="flag", env=None),
)
OPTIONS_BY_NAME: Dict[str, Option] = {o.name: o for o in OPTIONS}
# Keys of the config file: every option except --dev (command line only), plus nothing else.
CONFIG_KEYS = tuple(o.name for o in OPTIONS if o.env is not None)


@dataclasses.dataclass
class Config:
    """The resolved configuration of ``tornado-rt serve``. ``sources`` tells, per option, where
    its value came from (``--flag``, ``ENV_VAR``, ``key in FILE`` or ``default``)."""

    values: Dict[str, Any]
    sources: Dict[str, str]
    config_file: Optional[str] = None
    jwt_public_key_pem: Optional[str] = None
    generated: Dict[str, str] = dataclasses.field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values")
        if values is not None and name in values:
            return values[name]
        raise AttributeError(name)

    def label(self, name: str) -> str:
        """How to name an option in an error: as the user gave it, with the option flag."""
        option = OPTIONS_BY_NAME[name]
        source = self.sources.get(name, "default")
        if source in ("default", option.flag):
            return option.flag
        return f"{source} ({option.flag})"


# --- argument parsing ---------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message} (see '{PROG} serve --help')\n")


_EPILOG = """\
Every option can also be set with an environment variable TORNADO_RT_<NAME> (e.g. TORNADO_RT_PORT,
TORNADO_RT_API_KEYS=key1,key2) or with its snake_case name as a key of the TOML file given by
--config / TORNADO_RT_CONFIG (e.g. port = 8080, api_keys = ["key1"]). The names:
  {names}
Precedence: command line > environment > config file > default.

The HTTP server API (Authorization: Bearer <api key>): POST /api/publish, POST /api/disconnect,
POST /api/revoke, PUT/GET /api/directory, GET /api/stats; without a key: GET /api/types,
GET /api/openapi.json, GET /api/docs, GET /healthz, GET /metrics. WebSocket: ws://HOST:PORT/ws/core/?jwt_token=<JWT>.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A Baserow-compatible real-time WebSocket server.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    names = "\n  ".join(textwrap.wrap(", ".join(o.name for o in OPTIONS if o.env is not None), 96))
    serve = commands.add_parser(
        "serve", help="run the standalone server",
        description="Run the standalone server: WebSocket endpoint for browsers, HTTP server API for "
                    "your backend.",
        epilog=_EPILOG.format(names=names), formatter_class=argparse.RawDescriptionHelpFormatter)
    types = commands.add_parser(
        "types", help="list every registered message type",
        description="List every message type of the plugins 'serve' would load (built-in and "
                    "installed entry points): plugin, default audience, routing keys and the payload "
                    "keys a publish must carry.")
    types.add_argument("--json", action="store_true", help="print JSON (the same as GET /api/types)")
    groups = {
        "server": serve.add_argument_group("server"),
        "auth": serve.add_argument_group("authentication and access"),
        "limits": serve.add_argument_group("limits"),
    }
    serve.add_argument("--config", metavar="FILE", default=None,
                       help=f"TOML file with the same keys in snake_case [env: {ENV_CONFIG}]")
    for option in OPTIONS:
        env = f"env: {option.env_var}" if option.env_var else "command line only"
        shown = option.shown_default
        if shown is None and option.kind != "flag" and option.default not in (None, []):
            shown = ",".join(option.default) if isinstance(option.default, list) else str(option.default)
        default = f"; default: {shown}" if shown else ""
        text = f"{option.help} [{env}{default}]".replace("%", "%%")
        group = groups[option.group]
        if option.kind == "flag":
            group.add_argument(option.flag, dest=option.name, action="store_const", const=True, default=None,
                               help=text)
        elif option.kind == "list":
            group.add_argument(option.flag, dest=option.name, action="append", default=None,
                               metavar=option.metavar, help=text)
        else:
            group.add_argument(option.flag, dest=option.name, default=None, metavar=option.metavar, help=text)
    return parser


# --- resolution -------------------------------------------------------------------------------------

def _read_config_file(path: str, label: str) -> Dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{label}: {path} is not UTF-8 text") from None
    for key in data:
        if key not in CONFIG_KEYS:
            close = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key} in {path}: unknown key{hint}")
    return data


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Apply command line > environment > config file > default to every option and validate
    each value. Raises :class:`ConfigError` (one line naming the option)."""
    config_path = args.config
    label = "--config"
    if config_path is None and environ.get(ENV_CONFIG, "").strip():
        config_path, label = environ[ENV_CONFIG].strip(), f"{ENV_CONFIG} (--config)"
    file_values = _read_config_file(config_path, label) if config_path else {}
    config_dir = os.path.dirname(os.path.abspath(config_path)) if config_path else None

    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    for option in OPTIONS:
        given = getattr(args, option.name, None)
        env = option.env_var
        if given is not None:
            raw, source = given, option.flag
        elif env and environ.get(env, "").strip():
            raw, source = environ[env], env
        elif option.name in file_values:
            raw, source = file_values[option.name], f"{option.name} in {config_path}"
        else:
            values[option.name] = list(option.default) if isinstance(option.default, list) else option.default
            sources[option.name] = "default"
            continue
        named = source if source == option.flag else f"{source} ({option.flag})"
        try:
            values[option.name] = option.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{named}: {exc}") from None
        sources[option.name] = source
        if (option.name == "jwt_public_key" and source.endswith(f"in {config_path}")
                and not values[option.name].startswith("-----BEGIN")):
            values[option.name] = os.path.join(config_dir, values[option.name])
    config = Config(values, sources, config_path)
    _check(config)
    return config


def _check(config: Config) -> None:
    """Cross-option checks: keys present (or generated with --dev), key file readable."""
    algorithms = config.jwt_algorithms
    hmac_algs = [a for a in algorithms if a in _HMAC]
    asym_algs = [a for a in algorithms if a not in _HMAC]
    if config.jwt_public_key is not None:
        config.jwt_public_key_pem = _load_public_key(config.jwt_public_key, config.label("jwt_public_key"),
                                                     config.sources["jwt_public_key"])
    if asym_algs and config.jwt_public_key_pem is None:
        raise ConfigError(f"--jwt-public-key: required for {', '.join(asym_algs)} (a PEM file with the public key)")
    if hmac_algs and not config.jwt_secret:
        if config.dev:
            config.values["jwt_secret"] = config.generated["jwt_secret"] = secrets.token_urlsafe(32)
        elif config.jwt_public_key_pem is not None:
            raise ConfigError(f"--jwt-algorithm: {', '.join(hmac_algs)} needs --jwt-secret; with "
                              "--jwt-public-key name its algorithm, e.g. --jwt-algorithm RS256")
        else:
            raise ConfigError("--jwt-secret: no JWT key configured; give --jwt-secret (HS*) or "
                              "--jwt-public-key (RS*/ES*/EdDSA), or run with --dev to generate one")
    if not config.api_keys:
        if config.dev:
            key = secrets.token_urlsafe(24)
            config.values["api_keys"] = [key]
            config.generated["api_key"] = key
        else:
            raise ConfigError("--api-key: no API key configured for the HTTP server API; give --api-key "
                              "(or TORNADO_RT_API_KEYS), or run with --dev to generate one")
    if config.dev and config.allowed_origins is None:
        config.values["allowed_origins"] = ["*"]
    try:
        settings(config)
    except ValueError as exc:
        text = str(exc)
        names = sorted((o.name for o in OPTIONS), key=len, reverse=True)
        name = next((n for n in names if text.startswith(n)), None)
        raise ConfigError(f"{config.label(name)}: {text}" if name else f"configuration: {text}") from None


def _load_public_key(value: str, label: str, source: str) -> str:
    if value.lstrip().startswith("-----BEGIN") and not source.startswith("--"):
        pem = value  # the environment variable holds the PEM itself
    else:
        try:
            with open(value, "r", encoding="utf-8") as fh:
                pem = fh.read()
        except OSError as exc:
            raise ConfigError(f"{label}: cannot read {value}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{label}: {value} is not a PEM text file") from None
    try:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
        load_pem_public_key(pem.encode("utf-8"))
    except ImportError:  # pragma: no cover - pyjwt[crypto] is a dependency
        pass
    except (ValueError, TypeError):
        where = "the value" if pem is value else value
        raise ConfigError(f"{label}: {where} is not a PEM public key") from None
    return pem


def settings(config: Config) -> Settings:
    """The :class:`~tornado_rt.Settings` of a resolved configuration."""
    return Settings(
        jwt_secret=config.jwt_secret,
        jwt_public_key=config.jwt_public_key_pem,
        jwt_algorithms=tuple(config.jwt_algorithms),
        jwt_user_claim=config.jwt_user_claim,
        jwt_leeway=config.jwt_leeway,
        jwt_audience=config.jwt_audience,
        jwt_issuer=config.jwt_issuer,
        allow_anonymous=not config.no_anonymous,
        path_prefix=config.path_prefix,
        allowed_origins=config.allowed_origins,
        max_message_size=config.max_message_size,
        max_subscriptions=config.max_subscriptions,
        max_incoming_rate=config.max_incoming_rate,
        max_incoming_burst=config.max_incoming_burst,
        max_connections=config.max_connections,
        max_connections_per_user=config.max_connections_per_user,
        max_outgoing_buffer=config.max_outgoing_buffer,
        ping_interval=config.ping_interval,
        ping_timeout=config.ping_timeout,
        header_timeout=config.header_timeout,
        idle_timeout=config.idle_timeout,
        body_timeout=config.body_timeout,
        max_unauthenticated_per_address=config.max_unauthenticated_per_address,
    )


def make_broker(config: Config) -> Any:
    """The broker named by ``--broker``: None for in-process, else a RedisBroker (lazy import)."""
    url = config.broker
    if url is None:
        return None
    label = config.label("broker")
    try:
        from .redis_broker import RedisBroker
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == f"{__package__}.redis_broker":
            raise ConfigError(f"{label}: this version of tornado-rt has no Redis broker; use 'in-process'") from None
        raise ConfigError(f"{label}: the Redis broker needs the redis extra: pip install 'tornado-rt[redis]'") from None
    try:
        return RedisBroker(url)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{label}: {exc}") from None


# --- serving ----------------------------------------------------------------------------------------

def _display_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def dev_banner(config: Config, base_http: str, ws_url: str) -> str:
    """What ``--dev`` prints: generated keys, a JWT for user 1, a curl example, a browser snippet."""
    import json

    import jwt

    lines = ["", "tornado-rt development mode: never use these settings in production."]
    if "jwt_secret" in config.generated:
        lines.append(f"  JWT secret (generated): {config.generated['jwt_secret']}")
    if "api_key" in config.generated:
        lines.append(f"  API key (generated):    {config.generated['api_key']}")
    api_key = config.api_keys[0]
    hmac_algs = [a for a in config.jwt_algorithms if a in _HMAC]
    token = None
    if hmac_algs and config.jwt_secret:
        claims = {config.jwt_user_claim: 1, "exp": int(time.time()) + 24 * 3600, "token_type": "access"}
        if config.jwt_audience:
            claims["aud"] = config.jwt_audience
        if config.jwt_issuer:
            claims["iss"] = config.jwt_issuer
        token = jwt.encode(claims, config.jwt_secret, algorithm=hmac_algs[0])
        lines.append(f"  JWT for user 1 (valid 24 h): {token}")
    else:
        lines.append("  (no JWT printed: the allowed algorithms need your private key to sign one)")
    lines.append("  Demo directory: workspace 1 = [user 1], table 1 in workspace 1 "
                 "(PUT /api/directory replaces it)")
    if config.allowed_origins == ["*"] and config.sources.get("allowed_origins") == "default":
        lines.append("  Any WebSocket Origin is allowed (dev mode without --allowed-origin).")
    message = {"message": {"type": "rows_created", "table_id": 1, "rows": [{"id": 1, "name": "hello"}],
                           "metadata": {}, "before_row_id": None}}
    lines.append("  Publish to the subscribers of table 1:")
    lines.append(f"    curl -sS -X POST {base_http}api/publish -H {shlex.quote('Authorization: Bearer ' + api_key)}"
                 f" -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(message))}")
    if token is not None:
        lines.append("  Browser console (connect and subscribe to table 1):")
        lines.append(f"    ws = new WebSocket({json.dumps(ws_url + '?jwt_token=' + token)}); "
                     "ws.onmessage = (e) => console.log(JSON.parse(e.data)); "
                     "ws.onopen = () => ws.send(JSON.stringify({page: 'table', table_id: 1}));")
    lines.append("")
    return "\n".join(lines)


async def serve(config: Config) -> int:
    """Run until SIGINT/SIGTERM; returns the exit code."""
    from tornado.netutil import bind_sockets

    from .httpapi import make_app
    from .listener import GuardedHTTPServer, attach_metrics
    from .server import RealtimeServer, tune_gc

    broker = make_broker(config)
    server = RealtimeServer(settings(config), broker=broker)
    if config.dev and server.directory is not None:
        server.directory.load({"workspaces": {"1": [1]}, "tables": {"1": 1}})
    app = make_app(server, config.api_keys, metrics=not config.no_metrics, max_body_size=config.max_body_size)
    try:
        sockets = bind_sockets(config.port, config.host)
    except OSError as exc:
        label = config.label("host") if isinstance(exc, socket.gaierror) else config.label("port")
        raise ConfigError(f"{label}: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
    try:
        await server.start()
    except Exception as exc:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"{config.label('broker')}: cannot start the broker: {exc}") from None
    _raise_fd_limit()  # after every refusal, which must stay one line on stderr
    # The guarded server adds the header/idle/body timeouts, the per-address cap and an accept
    # loop that survives running out of file descriptors (tornado_rt.listener). Headers up to
    # 160 KiB: an oversized token then gets its documented 4001, not a dropped connection
    # (Tornado's default limit is 64 KiB).
    http_server = GuardedHTTPServer(app, settings=server.settings, max_header_size=160 * 1024)
    attach_metrics(http_server, app)
    http_server.add_sockets(sockets)
    tune_gc()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            os._exit(128 + signum)  # a second signal: the operator wants out now
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on Unix
            signal.signal(signum, lambda s, _f: loop.call_soon_threadsafe(on_signal, s))

    port = sockets[0].getsockname()[1]
    host = _display_host(config.host)
    base_http = f"http://{host}:{port}/"
    ws_url = f"ws://{host}:{port}{config.path_prefix}"
    if config.dev:
        print(dev_banner(config, base_http, ws_url), flush=True)
    print(f"tornado-rt listening: {ws_url}  {base_http}api/", flush=True)

    await stop.wait()

    http_server.stop()  # stop accepting
    await server.shutdown()  # every WebSocket closed with 1001 after what was published
    try:
        await asyncio.wait_for(http_server.close_all_connections(), timeout=5.0)
    except asyncio.TimeoutError:
        log.warning("some HTTP connections did not close in time")
    log.info("stopped")
    return 0


def _raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each connection is a descriptor) and log
    the result."""
    from .listener import raise_fd_limit

    try:
        result = raise_fd_limit()
    except (OSError, ValueError) as exc:
        log.warning("file descriptor limit: could not raise the soft RLIMIT_NOFILE: %s", exc)
        return
    if result is None:  # pragma: no cover - not on Unix
        return
    before, after, hard = result
    import resource

    hard_text = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    if after != before:
        log.info("file descriptor limit: raised the soft RLIMIT_NOFILE from %d to %d (hard limit %s)",
                 before, after, hard_text)
    else:
        log.info("file descriptor limit: RLIMIT_NOFILE %d (hard limit %s)", after, hard_text)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _types(as_json: bool) -> int:
    """``tornado-rt types [--json]``."""
    import json

    from .catalogue import catalogue, serve_registry, table
    registry = serve_registry()
    sys.stdout.write(json.dumps(catalogue(registry), indent=2) + "\n" if as_json else table(registry))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tornado-rt`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "types":
        return _types(args.json)
    if args.command != "serve":
        parser.print_help(sys.stderr)
        return 2
    try:
        config = resolve(args, os.environ)
        _setup_logging(config.log_level)
        return asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 0
