"""``tornado-rt token | publish | listen``: command-line tools around a running server.

They read the same configuration as ``tornado-rt serve`` (flags, ``TORNADO_RT_*`` environment,
the ``--config`` TOML file): ``token`` and ``listen --user`` sign with the JWT secret (HS*) or
the private key (``--jwt-private-key``, RS*/ES*/EdDSA); ``publish`` uses the first API key; the
server's address comes from ``--host``/``--port``/``--path-prefix`` unless ``--url`` is given.

Exit codes: 0 success (``listen``: interrupted, or ``--count`` messages printed); 1 the server
refused or could not be reached (the reason on stderr); 2 bad usage or configuration, one line
``tornado-rt: error: <option>: <why>`` naming the option.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .cli import PROG, Config, ConfigError, _display_host, _setup_logging, resolve
from .settings import HMAC_ALGORITHMS as _HMAC

_TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageError(ConfigError):
    """Bad usage of a tool: exit 2."""


class Failure(Exception):
    """The server refused or could not be reached: exit 1."""


def add_tool_commands(commands: Any, add_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``token``, ``publish`` and ``listen`` to the ``tornado-rt`` sub-commands."""
    token = commands.add_parser(
        "token", help="print a JWT for a user, signed with the configured secret or private key",
        description="Print a JWT for --user, signed with the configured --jwt-secret (HS*) or "
                    "--jwt-private-key (RS*/ES*/EdDSA), with the claims the server checks.")
    _token_arguments(token)
    add_options(token)

    publish = commands.add_parser(
        "publish", help="publish through the HTTP server API and print the answer",
        description="Publish MESSAGE (a JSON message, envelope, or array of them) through the HTTP server "
                    "API; without MESSAGE, publish every JSON line of stdin. Prints each answer as a JSON "
                    "line. Uses the first --api-key.")
    publish.add_argument("message", nargs="?", metavar="MESSAGE", help="JSON, e.g. '{\"type\": ...}'")
    publish.add_argument("--to", metavar="JSON", help="audience of the messages, e.g. '{\"user_ids\": [7]}'")
    publish.add_argument("--ignore-web-socket-id", metavar="ID", help="connection that must not receive it")
    publish.add_argument("--exclude-user-id", metavar="ID", action="append", help="user left out (repeatable)")
    _url_argument(publish, "http://127.0.0.1:8000/")
    add_options(publish)

    listen = commands.add_parser(
        "listen", help="connect, subscribe and print every message as a JSON line",
        description="Connect to the WebSocket endpoint, subscribe to each --page and print every message "
                    "as one JSON line, reconnecting (and resubscribing) until interrupted. Needs the client "
                    "extra: pip install 'tornado-rt[client]'.")
    listen.add_argument("--token", metavar="JWT", help="connect with this token (or 'anonymous')")
    _token_arguments(listen, required=False)
    listen.add_argument("--page", metavar="PAGE", action="append", default=[],
                        help="page to subscribe to, e.g. table:table_id=10 or row:table_id=1,row_id=2 (repeatable)")
    listen.add_argument("--count", metavar="N", help="exit after N messages")
    _url_argument(listen, "ws://127.0.0.1:8000/ws/core/")
    add_options(listen)


def _token_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--user", metavar="ID", required=required, help="user id put in the user claim")
    parser.add_argument("--ttl", metavar="DURATION", default="1h", help="lifetime: 90, 90s, 15m, 1h, 7d (default 1h)")
    parser.add_argument("--claim", metavar="KEY=VALUE", action="append", default=[],
                        help="extra claim (repeatable); VALUE is read as JSON when it is, else as a string")


def _url_argument(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--url", metavar="URL",
                        help=f"server to talk to, e.g. {example} (default: from --host, --port, --path-prefix)")


# --- token ----------------------------------------------------------------------------------------------

def parse_ttl(value: str) -> float:
    match = _TTL.match(value or "")
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"--ttl: a positive duration like 90s, 15m, 1h or 7d, got {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def parse_user(value: str) -> Any:
    text = (value or "").strip()
    if not text:
        raise UsageError("--user: must not be empty")
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def parse_claims(items: List[str]) -> Dict[str, Any]:
    claims: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--claim: use KEY=VALUE, got {item!r}")
        try:
            claims[key.strip()] = json.loads(raw)
        except ValueError:
            claims[key.strip()] = raw
    return claims


def _signing_key(config: Config) -> Tuple[Any, str]:
    """The key and algorithm that sign tokens the server accepts, or a UsageError."""
    algorithms = list(config.jwt_algorithms)
    private = config.jwt_private_key
    if private is not None:
        asym = [a for a in algorithms if a not in _HMAC]
        if not asym:
            raise UsageError(f"{config.label('jwt_algorithms')}: --jwt-private-key needs its algorithm among the "
                             "accepted ones, e.g. --jwt-algorithm RS256")
        return _load_private_key(private, config), asym[0]
    hmac_algs = [a for a in algorithms if a in _HMAC]
    if config.jwt_secret and hmac_algs:
        return config.jwt_secret, hmac_algs[0]
    if config.jwt_public_key is not None:
        raise UsageError("--jwt-private-key: only a public key is configured (--jwt-public-key), which cannot "
                         "sign; give the private key with --jwt-private-key FILE (or TORNADO_RT_JWT_PRIVATE_KEY)")
    if config.jwt_secret:
        raise UsageError(f"{config.label('jwt_algorithms')}: --jwt-secret signs HS256/HS384/HS512 tokens, "
                         "but none of them is accepted")
    raise UsageError("--jwt-secret: no key to sign tokens with; give --jwt-secret (HS*) or "
                     "--jwt-private-key (RS*/ES*/EdDSA), as for the server")


def _load_private_key(value: str, config: Config) -> Any:
    label = config.label("jwt_private_key")
    source = config.sources.get("jwt_private_key", "")
    if value.lstrip().startswith("-----BEGIN") and not source.startswith("--"):
        pem = value
    else:
        try:
            with open(value, "r", encoding="utf-8") as fh:
                pem = fh.read()
        except OSError as exc:
            raise UsageError(f"{label}: cannot read {value}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise UsageError(f"{label}: {value} is not a PEM text file") from None
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    try:
        return load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError):
        where = "the value" if pem is value else value
        raise UsageError(f"{label}: {where} is not an unencrypted PEM private key") from None


def make_token(config: Config, user: Any, ttl: float, claims: Dict[str, Any]) -> str:
    """A token for ``user`` that the configured server accepts."""
    import jwt

    key, algorithm = _signing_key(config)
    now = int(time.time())
    payload: Dict[str, Any] = {config.jwt_user_claim: user, "iat": now, "exp": now + max(1, int(ttl)),
                               "token_type": "access"}
    if config.jwt_audience:
        payload["aud"] = config.jwt_audience
    if config.jwt_issuer:
        payload["iss"] = config.jwt_issuer
    payload.update(claims)
    return jwt.encode(payload, key, algorithm=algorithm)


def _token_function(config: Config, args: argparse.Namespace) -> Callable[[], str]:
    user, ttl, claims = parse_user(args.user), parse_ttl(args.ttl), parse_claims(args.claim)
    _signing_key(config)  # refuse now, not at the first connection

    def fresh() -> str:
        return make_token(config, user, ttl, {"jti": os.urandom(8).hex(), **claims})
    return fresh


# --- publish --------------------------------------------------------------------------------------------

def _http_url(config: Config, args: argparse.Namespace) -> str:
    return args.url or f"http://{_display_host(config.host)}:{config.port}/"


def _ws_url(config: Config, args: argparse.Namespace) -> str:
    return args.url or f"ws://{_display_host(config.host)}:{config.port}{config.path_prefix}"


def _json_arg(text: str, label: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{label}: not valid JSON: {exc}") from None


def _envelopes(value: Any, args: argparse.Namespace, to: Any, label: str) -> List[Dict[str, Any]]:
    from .client import as_envelope

    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(i, dict) for i in items):
        raise UsageError(f"{label}: a JSON object (message or envelope) or an array of them")
    envelopes = []
    for item in items:
        envelope = as_envelope(item)
        if "message" in envelope:
            if to is not None:
                envelope.setdefault("to", to)
            if args.ignore_web_socket_id:
                envelope.setdefault("ignore_web_socket_id", args.ignore_web_socket_id)
            if args.exclude_user_id:
                envelope.setdefault("exclude_user_ids", [parse_user(u) for u in args.exclude_user_id])
        envelopes.append(envelope)
    return envelopes


def run_publish(config: Config, args: argparse.Namespace) -> int:
    from .client import ApiError, ClientError, Publisher

    if not config.api_keys:
        raise UsageError("--api-key: no API key configured for the HTTP server API (the same key as the server's)")
    to = _json_arg(args.to, "--to") if args.to is not None else None
    source = [("MESSAGE", args.message)] if args.message is not None else _stdin_lines()
    with Publisher(_http_url(config, args), config.api_keys[0]) as publisher:
        for label, text in source:
            value = _json_arg(text, label)
            envelopes = _envelopes(value, args, to, label)
            try:
                if isinstance(value, list):
                    answer = publisher.publish_many(envelopes)
                else:
                    answer = publisher.publish_envelope(envelopes[0])
            except ApiError as exc:
                raise Failure(f"{label}: {exc}") from None
            except ClientError as exc:
                raise Failure(str(exc)) from None
            print(json.dumps(answer), flush=True)
    return 0


def _stdin_lines() -> Any:
    for number, line in enumerate(sys.stdin, 1):
        if line.strip():
            yield f"stdin line {number}", line


# --- listen ---------------------------------------------------------------------------------------------

def parse_page(value: str) -> Tuple[str, Dict[str, Any]]:
    name, _, rest = value.partition(":")
    if not name.strip():
        raise UsageError(f"--page: use PAGE:KEY=VALUE[,KEY=VALUE], e.g. table:table_id=10, got {value!r}")
    params: Dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--page: use PAGE:KEY=VALUE[,KEY=VALUE], e.g. table:table_id=10, got {value!r}")
        raw = raw.strip()
        params[key.strip()] = int(raw) if re.fullmatch(r"-?\d+", raw) else raw
    return name.strip(), params


def _count(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    if not re.fullmatch(r"\s*\d+\s*", value) or int(value) < 1:
        raise UsageError(f"--count: must be a positive integer, got {value!r}")
    return int(value)


async def _listen(url: str, token: Any, pages: List[Tuple[str, Dict[str, Any]]], count: Optional[int]) -> int:
    from .client import ClientError, Subscriber

    async def resubscribed() -> None:
        try:
            await subscriber.ready(timeout=60)
        except asyncio.TimeoutError:
            print(f"{PROG}: some pages were not subscribed again", file=sys.stderr, flush=True)
            return
        print(f"{PROG}: subscribed again to {len(subscriber.pages)} page(s)", file=sys.stderr, flush=True)

    def on_state(state: str, info: Dict[str, Any]) -> None:
        if state == "open":
            print(f"{PROG}: connected (web_socket_id {info.get('web_socket_id')})", file=sys.stderr, flush=True)
            if subscriber.connections > 1 and pages:
                pending.add(asyncio.ensure_future(resubscribed()))
        elif state == "reconnecting" and "delay" in info:
            why = (f"connection lost (close code {info['close_code']})" if info.get("close_code") is not None
                   else "cannot connect")
            print(f"{PROG}: {why}; retrying in {info['delay']:.1f}s", file=sys.stderr, flush=True)

    pending: Set["asyncio.Future[None]"] = set()
    subscriber = Subscriber(url, token, on_state=on_state)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on Unix
            pass
    try:
        await subscriber.connect()
        for page, params in pages:
            await subscriber.subscribe(page, **params)
            print(f"{PROG}: subscribed to {page} {json.dumps(params)}", file=sys.stderr, flush=True)
    except ClientError as exc:
        await subscriber.close()
        raise Failure(str(exc)) from None

    async def printer() -> int:
        printed = 0
        async for message in subscriber:
            print(json.dumps(message, ensure_ascii=False), flush=True)
            printed += 1
            if count is not None and printed >= count:
                return 0
        raise Failure(f"the server closed the connection for good (close code {subscriber.close_code}: "
                      f"{subscriber.close_reason})")

    printing = asyncio.ensure_future(printer())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([printing, stopping], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():  # interrupted: a normal end
            printing.cancel()
            return 0
        return printing.result()
    finally:
        stopping.cancel()
        for task in pending:
            task.cancel()
        await subscriber.close()


def run_listen(config: Config, args: argparse.Namespace) -> int:
    try:
        import websockets  # noqa: F401
    except ImportError:
        raise UsageError("listen: needs the client extra: pip install 'tornado-rt[client]'") from None
    if args.token is not None and args.user is not None:
        raise UsageError("--token: give either --token or --user, not both")
    if args.token is None and args.user is None:
        raise UsageError("--user: give --user ID (a token is signed with the configured key) or --token JWT")
    token: Any = args.token if args.token is not None else _token_function(config, args)
    pages = [parse_page(p) for p in args.page]
    count = _count(args.count)
    return asyncio.run(_listen(_ws_url(config, args), token, pages, count))


# --- entry --------------------------------------------------------------------------------------------

def run_tool(args: argparse.Namespace) -> int:
    """Run ``token``, ``publish`` or ``listen``; returns the exit code."""
    try:
        config = resolve(args, os.environ, check=False)
        if config.sources.get("log_level") == "default":
            _setup_logging("warning")
            # One run, one request: the publisher's note about a server without idempotency ids
            # is noise here.
            logging.getLogger("tornado_rt.client").setLevel(logging.ERROR)
        else:
            _setup_logging(config.log_level)
        if args.command == "token":
            print(make_token(config, parse_user(args.user), parse_ttl(args.ttl), parse_claims(args.claim)))
            return 0
        if args.command == "publish":
            return run_publish(config, args)
        return run_listen(config, args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Failure as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
