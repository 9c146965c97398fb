"""``tornado-rt serve``: the standalone server (docs/server-api.md); ``tornado-rt types``: the
message catalogue (:mod:`tornado_rt.catalogue`).

The options are not declared here: every one is a field of :class:`tornado_rt.settings.Settings`
(a server setting) or :class:`tornado_rt.settings.Standalone` (an option of this command only),
and this module derives the command line, the environment variables and the config file keys
from them. Every option has an environment variable (``TORNADO_RT_<NAME>``) and a key of the TOML
config file (the option's snake_case name, listed by ``tornado-rt serve --help``). Precedence:
command line > environment > config file > default. An empty environment variable counts as
unset.

Refusals (missing key, invalid value, unreadable file, bad TOML, unusable broker URL, a port that
cannot be bound) print one line ``tornado-rt: error: <option>: <why>`` on stderr and exit with
code 2. SIGINT/SIGTERM stop accepting, close every WebSocket with 1001 and exit 0; a second
signal exits at once.

``tornado-rt settings --markdown`` prints the README's settings table; ``--write-readme FILE``
rewrites it in place.
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
from typing import Any, Dict, List, Mapping, Optional, Sequence

from . import __version__
from .errors import FieldError
from .settings import (HMAC_ALGORITHMS, LOG_LEVELS, OPTIONS, SERVER_OPTIONS, Option, SettingError, Settings,
                       markdown_table, write_readme)

__all__ = ["ConfigError", "Config", "OPTIONS", "build_parser", "resolve", "settings", "make_broker", "serve",
           "main", "LOG_LEVELS"]

PROG = "tornado-rt"
ENV_CONFIG = "TORNADO_RT_CONFIG"
#: Sub-commands whose usage errors point at their own --help.
TOOL_COMMANDS = (" settings", " token", " publish", " listen")

log = logging.getLogger("tornado_rt.cli")


class ConfigError(FieldError):
    """A refusal to start: one line naming the option (``field``: the option as the user gave
    it, e.g. ``--port`` or ``TORNADO_RT_PORT (--port)``)."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message, field)


def _refuse(label: str, why: str) -> ConfigError:
    return ConfigError(f"{label}: {why}", label)


OPTIONS_BY_NAME: Dict[str, Option] = {o.key: o for o in OPTIONS}
# Keys of the config file: every option except --dev (command line only) and --config itself.
# Also the [[page_types]] and [[message_types]] tables (tornado_rt.typesconfig, docs/standalone.md).
TYPES_KEYS = ("page_types", "message_types")
CONFIG_KEYS = tuple(o.toml_key for o in OPTIONS if o.toml_key) + TYPES_KEYS
# Options naming a file: relative to the config file's folder when given there.
_FILE_OPTIONS = ("jwt_public_key", "jwt_private_key", "types", "directory", "tls_cert", "tls_key")


@dataclasses.dataclass
class Config:
    """The resolved configuration of ``tornado-rt serve``: one value per option ``key``
    (``config.port``). ``sources`` tells, per option, where its value came from (``--flag``,
    ``ENV_VAR``, ``key in FILE`` or ``default``)."""

    values: Dict[str, Any]
    sources: Dict[str, str]
    config_file: Optional[str] = None
    jwt_public_key_pem: Optional[str] = None
    ssl_context: Any = None  # an ssl.SSLContext with --tls-cert/--tls-key
    generated: Dict[str, str] = dataclasses.field(default_factory=dict)
    types_table: Dict[str, Any] = dataclasses.field(default_factory=dict)  # [[page_types]] ... of the file
    plugins: List[Any] = dataclasses.field(default_factory=list)  # the configured types
    webhook: Any = None  # the AccessWebhook of --access-url

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
        command = self.prog if self.prog.endswith(TOOL_COMMANDS) else f"{PROG} serve"
        self.exit(2, f"{PROG}: error: {message} (see '{command} --help')\n")


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


def _help_text(option: Option) -> str:
    """The ``--help`` line of an option: its help, its environment variable and its default."""
    env = f"env: {option.env_var}" if option.env_var else "command line only"
    shown = option.default_text()
    default = f"; default: {shown}" if shown else ""
    return f"{option.help} [{env}{default}]"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A Baserow-compatible real-time WebSocket server.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    names = "\n  ".join(textwrap.wrap(", ".join(CONFIG_KEYS), 96))
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
    types.add_argument("--config", metavar="FILE", default=None,
                       help="also list the [[page_types]] / [[message_types]] of this config file")
    types.add_argument("--types", metavar="FILE", default=None,
                       help="also list the types declared in this file (as 'serve --types FILE')")
    _add_options(serve)
    from .tools import add_tool_commands
    add_tool_commands(commands, _add_options)
    table = commands.add_parser(
        "settings", help="print the settings table (the README's) as Markdown",
        description="Print every setting (server settings and standalone options) as the README's "
                    "Markdown table, or rewrite that table in a README.")
    what = table.add_mutually_exclusive_group(required=True)
    what.add_argument("--markdown", action="store_true", help="print the table on stdout")
    what.add_argument("--write-readme", metavar="FILE", help="replace the table between the markers in FILE")
    return parser


def _add_options(serve: argparse.ArgumentParser) -> None:
    """The option table on a sub-command: ``serve`` and the tools read the same configuration."""
    groups = {
        "server": serve.add_argument_group("server"),
        "auth": serve.add_argument_group("authentication and access"),
        "limits": serve.add_argument_group("limits"),
    }
    for option in OPTIONS:
        text = _help_text(option).replace("%", "%%")
        group = groups[option.group]
        if option.kind == "flag":
            group.add_argument(option.flag, dest=option.key, action="store_const", const=True, default=None,
                               help=text)
        elif option.kind == "list":
            group.add_argument(option.flag, dest=option.key, action="append", default=None,
                               metavar=option.metavar, help=text)
        else:
            group.add_argument(option.flag, dest=option.key, default=None, metavar=option.metavar, help=text)


# --- resolution -------------------------------------------------------------------------------------

def _read_config_file(path: str, label: str) -> Dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise _refuse(label, f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise _refuse(label, f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise _refuse(label, f"{path} is not UTF-8 text") from None
    for key in data:
        if key not in CONFIG_KEYS:
            close = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _refuse(f"{key} in {path}", f"unknown key{hint}")
    return data


def _default(option: Option) -> Any:
    """The default as the option holds it (``no_anonymous`` is False when ``allow_anonymous`` is True)."""
    if option.invert:
        return not option.default
    return list(option.default) if isinstance(option.default, (list, tuple)) else option.default


def resolve(args: argparse.Namespace, environ: Mapping[str, str], check: bool = True) -> Config:
    """Apply command line > environment > config file > default to every option and validate
    each value. Raises :class:`ConfigError` (one line naming the option). ``check=False`` skips
    the cross-option checks of ``serve`` (the tools need only some keys)."""
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    config_path: Optional[str] = None
    file_values: Dict[str, Any] = {}
    # --config first: the file may hold any other key
    for option in sorted(OPTIONS, key=lambda o: o.key != "config"):
        key = option.key
        given = getattr(args, key, None)
        env = option.env_var
        if given is not None:
            raw, source = given, option.flag
        elif env and environ.get(env, "").strip():
            raw, source = environ[env], env
        elif key in file_values:
            raw, source = file_values[key], f"{key} in {config_path}"
        else:
            values[key] = _default(option)
            sources[key] = "default"
            continue
        named = source if source == option.flag else f"{source} ({option.flag})"
        try:
            values[key] = option.parse(raw)
        except ValueError as exc:
            raise _refuse(named, str(exc)) from None
        sources[key] = source
        if key == "config":
            config_path = values[key]
            file_values = _read_config_file(values[key], named)
        elif (key in _FILE_OPTIONS and config_path and source.endswith(f"in {config_path}")
                and not values[key].startswith("-----BEGIN")):
            values[key] = os.path.join(os.path.dirname(os.path.abspath(config_path)), values[key])
    config = Config(values, sources, config_path)
    config.types_table = {k: file_values[k] for k in TYPES_KEYS if k in file_values}
    if check:
        _check(config)
    return config


def _check(config: Config) -> None:
    """Cross-option checks: keys present (or generated with --dev), key file readable."""
    algorithms = config.jwt_algorithms
    hmac_algs = [a for a in algorithms if a in HMAC_ALGORITHMS]
    asym_algs = [a for a in algorithms if a not in HMAC_ALGORITHMS]
    if config.jwt_public_key is not None:
        config.jwt_public_key_pem = _load_public_key(config.jwt_public_key, config.label("jwt_public_key"),
                                                     config.sources["jwt_public_key"])
    if asym_algs and config.jwt_public_key_pem is None:
        raise _refuse("--jwt-public-key", f"required for {', '.join(asym_algs)} (a PEM file with the public key)")
    if hmac_algs and not config.jwt_secret:
        if config.dev:
            config.values["jwt_secret"] = config.generated["jwt_secret"] = secrets.token_urlsafe(32)
        elif config.jwt_public_key_pem is not None:
            raise _refuse("--jwt-algorithm", f"{', '.join(hmac_algs)} needs --jwt-secret; with "
                          "--jwt-public-key name its algorithm, e.g. --jwt-algorithm RS256")
        else:
            raise _refuse("--jwt-secret", "no JWT key configured; give --jwt-secret (HS*) or "
                          "--jwt-public-key (RS*/ES*/EdDSA), or run with --dev to generate one")
    if not config.api_keys:
        if config.dev:
            key = secrets.token_urlsafe(24)
            config.values["api_keys"] = [key]
            config.generated["api_key"] = key
        else:
            raise _refuse("--api-key", "no API key configured for the HTTP server API; give --api-key "
                          "(or TORNADO_RT_API_KEYS), or run with --dev to generate one")
    _check_tls(config)
    if config.dev and config.allowed_origins is None:
        config.values["allowed_origins"] = ["*"]
    if config.dev and config.sources.get("error_frames") == "default":
        config.values["error_frames"] = True
    _check_types(config)
    try:
        settings(config)
    except SettingError as exc:  # a check across settings (each value passed its own already)
        option = next((o for o in SERVER_OPTIONS if o.name == exc.field), None)
        label = config.label(option.key) if option else "configuration"
        raise _refuse(label, exc.message) from None


def _check_types(config: Config) -> None:
    """The access webhook and the configured types (tornado_rt.startup), refused before anything starts."""
    from .startup import StartupError, access_webhook, configured_types

    try:
        config.webhook = access_webhook(config.values)
        page_check = config.webhook.page_check if config.webhook is not None else None
        config.plugins = configured_types(config.values, config.types_table, config.config_file, page_check)
    except StartupError as exc:
        raise _refuse(config.label(exc.option) if exc.option else "--config", str(exc)) from None


def _check_tls(config: Config) -> None:
    if config.tls_cert is None and config.tls_key is None:
        return
    if config.tls_cert is None or config.tls_key is None:
        given, missing = ("tls_cert", "tls_key") if config.tls_key is None else ("tls_key", "tls_cert")
        raise _refuse(config.label(missing), f"required with {config.label(given)} (TLS needs both files)")
    from .tls import TLSFileError, server_context

    try:
        config.ssl_context = server_context(config.tls_cert, config.tls_key)
    except TLSFileError as exc:
        raise _refuse(config.label(exc.option), str(exc)) from None


def _load_public_key(value: str, label: str, source: str) -> str:
    if value.lstrip().startswith("-----BEGIN") and not source.startswith("--"):
        pem = value  # the environment variable holds the PEM itself
    else:
        try:
            with open(value, "r", encoding="utf-8") as fh:
                pem = fh.read()
        except OSError as exc:
            raise _refuse(label, f"cannot read {value}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise _refuse(label, f"{value} is not a PEM text file") from None
    try:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
        load_pem_public_key(pem.encode("utf-8"))
    except ImportError:  # pragma: no cover - pyjwt[crypto] is a dependency
        pass
    except (ValueError, TypeError):
        where = "the value" if pem is value else value
        raise _refuse(label, f"{where} is not a PEM public key") from None
    return pem


def settings(config: Config) -> Settings:
    """The :class:`~tornado_rt.Settings` of a resolved configuration (every server setting;
    ``jwt_public_key`` is the PEM read from the file the option names)."""
    given: Dict[str, Any] = {}
    for option in SERVER_OPTIONS:
        value = config.values[option.key]
        if option.invert:
            value = not value
        elif option.type == "list" and value is not None:
            value = tuple(value)
        given[option.name] = value
    given["jwt_public_key"] = config.jwt_public_key_pem
    return Settings(**given)


def make_broker(config: Config) -> Any:
    """The broker named by ``--broker``: None for in-process, else a RedisBroker, or for several
    comma-separated URLs a PartitionedRedisBroker (lazy imports)."""
    url = config.broker
    if url is None:
        return None
    label = config.label("broker")
    try:
        from .redis_broker import RedisBroker
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == f"{__package__}.redis_broker":
            raise _refuse(label, "this version of tornado-rt has no Redis broker; use 'in-process'") from None
        raise _refuse(label, "the Redis broker needs the redis extra: pip install 'tornado-rt[redis]'") from None
    if config.directory is not None:
        # One directory for the cluster lives in Redis (docs/redis.md): a file per process would
        # be a second source of truth, diverging from it at the first change through another one.
        raise _refuse(config.label("directory"), "cannot be combined with the Redis broker "
                      f"({label}): the cluster's directory is kept in Redis; to seed it from a file, "
                      "PUT /api/directory with the file's content")
    try:
        # share_directory: the directory snapshot is kept in Redis, loaded before serving.
        if "," in url:
            from .redis_partitions import PartitionedRedisBroker
            return PartitionedRedisBroker(url.split(","), config.redis_channel_prefix,
                                          stream_length=config.redis_stream_length, share_directory=True)
        return RedisBroker(url, config.redis_channel_prefix, stream_length=config.redis_stream_length,
                           share_directory=True)
    except (ValueError, TypeError) as exc:
        raise _refuse(label, str(exc)) from None


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

    lines = ["", "tornado-rt development mode: never use these settings in production."]
    if "jwt_secret" in config.generated:
        lines.append(f"  JWT secret (generated): {config.generated['jwt_secret']}")
    if "api_key" in config.generated:
        lines.append(f"  API key (generated):    {config.generated['api_key']}")
    api_key = config.api_keys[0]
    from .tools import make_token  # the one place tokens are minted (as `tornado-rt token`)

    token: Optional[str]
    try:
        token = make_token(config, 1, 24 * 3600, {})
    except (ConfigError, ImportError):  # no key that signs (or no cryptography for a private key)
        token = None
    if token is not None:
        lines.append(f"  JWT for user 1 (valid 24 h): {token}")
    else:
        lines.append("  (no JWT printed: the allowed algorithms need your private key to sign one)")
    lines.append(f"  Admin page (live stats; enter the API key): {base_http}admin")
    lines.append("  Demo directory: workspace 1 = [user 1], table 1 in workspace 1 "
                 "(PUT /api/directory replaces it)")
    if config.allowed_origins == ["*"] and config.sources.get("allowed_origins") == "default":
        lines.append("  Any WebSocket Origin is allowed (dev mode without --allowed-origin).")
    if config.values.get("error_frames") and config.sources.get("error_frames") == "default":
        lines.append("  Error frames are on: a refused subscription or an unreadable frame is answered with "
                     "{\"type\": \"error\", ...} (not Baserow's wire; --dev only).")
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
    from .startup import StartupError, guard_pages, log_startup, make_directory, reload_directory

    broker = make_broker(config)
    try:
        directory = make_directory(config.directory)
        try:
            server = RealtimeServer(settings(config), broker=broker, plugins=config.plugins, policy=directory)
        except ValueError as exc:  # a configured type named like one of another plugin
            raise StartupError("types" if config.types else None, str(exc)) from None
        guard_pages(server, config.webhook, config.access_pages)
    except StartupError as exc:
        raise _refuse(config.label(exc.option) if exc.option else "--config", str(exc)) from None
    if config.dev and directory.store is None:
        directory.load({"workspaces": {"1": [1]}, "tables": {"1": 1}})
    app = make_app(server, config.api_keys, metrics=not config.no_metrics, max_body_size=config.max_body_size)
    try:
        sockets = bind_sockets(config.port, config.host)
    except OSError as exc:
        label = config.label("host") if isinstance(exc, socket.gaierror) else config.label("port")
        raise _refuse(label, f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
    try:
        await server.start()
    except Exception as exc:
        for sock in sockets:
            sock.close()
        raise _refuse(config.label('broker'), f"cannot start the broker: {exc}") from None
    _raise_fd_limit()  # after every refusal, which must stay one line on stderr
    log_startup(server, config.plugins, directory, config.webhook)  # likewise
    # The guarded server adds the header/idle/body timeouts, the per-address cap and an accept
    # loop that survives running out of file descriptors (tornado_rt.listener). Headers up to
    # 160 KiB: an oversized token then gets its documented 4001, not a dropped connection
    # (Tornado's default limit is 64 KiB).
    http_server = GuardedHTTPServer(app, settings=server.settings, max_header_size=160 * 1024,
                                    ssl_options=config.ssl_context)
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
    if hasattr(signal, "SIGHUP"):  # systemctl reload: the directory file and renewed TLS files
        def on_sighup() -> None:
            if config.ssl_context is not None:
                from .tls import reload

                reload(config.ssl_context, config.tls_cert, config.tls_key)
            if config.ssl_context is None or directory.store is not None:
                reload_directory(directory)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)

    port = sockets[0].getsockname()[1]
    host = _display_host(config.host)
    secure = "s" if config.ssl_context is not None else ""
    base_http = f"http{secure}://{host}:{port}/"
    ws_url = f"ws{secure}://{host}:{port}{config.path_prefix}"
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
    if config.webhook is not None:
        config.webhook.close()
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


def _types(as_json: bool, config_file: Optional[str] = None, types_file: Optional[str] = None) -> int:
    """``tornado-rt types [--json] [--config FILE] [--types FILE]``."""
    import json

    from .catalogue import catalogue, serve_registry, table
    from .startup import StartupError, configured_types

    registry = serve_registry()
    declared = _read_config_file(config_file, "--config") if config_file else {}
    try:  # pages behind the access webhook are listed, never served, here: their check refuses
        for plugin in configured_types({"types": types_file}, {k: declared[k] for k in TYPES_KEYS if k in declared},
                                       config_file, lambda page: _deny):
            registry.add(plugin)
    except StartupError as exc:
        raise _refuse("--types" if exc.option else "--config", str(exc)) from None
    sys.stdout.write(json.dumps(catalogue(registry), indent=2) + "\n" if as_json else table(registry))
    return 0


def _deny(*args: Any, **kwargs: Any) -> bool:
    return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tornado-rt`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "types":
        try:
            return _types(args.json, args.config, args.types)
        except ConfigError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
            return 2
    if args.command in ("token", "publish", "listen"):
        from .tools import run_tool
        return run_tool(args)
    if args.command == "settings":
        if not args.write_readme:
            sys.stdout.write(markdown_table())
            return 0
        try:
            write_readme(args.write_readme)
        except (OSError, ValueError) as exc:  # unreadable, or without the markers
            why = exc.strerror if isinstance(exc, OSError) else "the settings-table markers are missing"
            print(f"{PROG}: error: --write-readme: {args.write_readme}: {why}", file=sys.stderr)
            return 2
        return 0
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
