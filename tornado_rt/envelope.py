"""Envelopes: what travels from a publisher through the broker to every process's router.

An :class:`Envelope` holds a message already serialized (``data``, JSON text) together with its
audience in a resolved-enough, serializable form, so that a broker can ship it to other processes
as it is. This module also turns a publisher's ``message`` + ``to`` into an envelope, validating
against the registry; every refusal is a :class:`PublishError` naming the type and the key.

Audience specs (lists, so that they survive JSON):

* ``["page", group]`` — connections subscribed to that page group;
* ``["users", [user ids]]``;
* ``["all"]`` — every connection, anonymous ones included;
* ``["workspaces", [workspace ids], extra user id or None]`` — current members (at delivery);
* ``["table_workspace", table id, extra]`` — members of the table's workspace;
* ``["user_workspaces", user id, extra]`` — members of every workspace of the user.

Idempotency: an envelope may carry an ``id`` (1 to 128 visible ASCII characters, e.g. a UUID)
chosen by the publisher. Every process delivers a given id at most once within the dedup window
(``Settings.dedup_window`` / ``dedup_max_ids``), so retrying a publish whose answer was lost or
ambiguous (a timeout, an HTTP 503) with the same id never delivers it twice.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Callable, Dict, Hashable, Iterable, List, Optional

import ujson

from .errors import FieldError, require_id, require_ids
from .policy import Directory
from .principal import normalize_id
from .registry import MessageType, PageType, Registry

MESSAGE, INDIVIDUAL, DISCONNECT, REVOKE = "message", "individual", "disconnect", "revoke"
#: A change of the in-memory directory (``type``: the operation, ``data``: its arguments as a JSON
#: array), applied by every process's router in stream order (see :meth:`Directory.apply`).
DIRECTORY = "directory"

#: A presence event decided by one process for the whole cluster (presence extension with the
#: Redis broker): ``type`` presence_joined / presence_left, ``audience`` ["page", group],
#: ``user_ids`` [the user]. Every process tells its connections that asked for that page.
PRESENCE = "presence"

_MISSING = object()

#: The longest envelope id accepted.
MAX_ID_LENGTH = 128
_ID = re.compile(r"[\x21-\x7e]{1,%d}\Z" % MAX_ID_LENGTH)


class PublishError(FieldError, ValueError):
    """A publish was refused. ``field`` is the dotted path of the offending value (or None),
    ``message_type`` the type concerned (or None)."""

    def __init__(self, text: str, field: Optional[str] = None, message_type: Optional[str] = None):
        super().__init__(text, field)
        self.message_type = message_type


class Envelope:
    """One unit of delivery. Brokers ship :meth:`to_wire` and rebuild with :meth:`from_wire`.

    Only the serialized text travels, never the publisher's dict: a caller that changes its dict
    after ``publish()`` returns cannot change what is delivered or what side effects see.

    ``delivered`` is not part of the wire form: the router of *this* process adds to it the number
    of connections it handed the message to (what ``publish_async()`` and ``POST /api/publish``
    report). A broker that carries envelopes between processes counts only where the publisher's
    own envelope object is delivered: this process."""

    __slots__ = ("kind", "type", "data", "audience", "ignore", "exclude", "payloads",
                 "user_ids", "permission_group", "id", "position", "delivered")

    def __init__(self, kind: str, type: Optional[str] = None, data: Optional[str] = None,
                 audience: Optional[list] = None, ignore: Any = None,
                 exclude: Optional[list] = None, payloads: Optional[list] = None,
                 user_ids: Optional[list] = None, permission_group: Optional[str] = None,
                 id: Optional[str] = None):
        self.kind = kind
        self.type = type
        self.data = data
        self.audience = audience
        self.ignore = ignore
        self.exclude = exclude
        self.payloads = payloads
        self.user_ids = user_ids
        self.permission_group = permission_group
        self.id = id  # idempotency key (see the module docstring), or None
        #: (epoch, offset) of a page message given by a broker that numbers them cluster-wide
        #: (the Redis broker; recovery extension), else None. Not part of the wire form.
        self.position: Optional[tuple] = None
        self.delivered = 0

    def to_wire(self) -> Dict[str, Any]:
        wire = {"k": self.kind}
        for name, key in (("type", "t"), ("data", "d"), ("audience", "a"), ("ignore", "i"),
                          ("exclude", "x"), ("payloads", "p"), ("user_ids", "u"),
                          ("permission_group", "g"), ("id", "id")):
            value = getattr(self, name)
            if value is not None:
                wire[key] = value
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "Envelope":
        return cls(wire["k"], wire.get("t"), wire.get("d"), wire.get("a"), wire.get("i"),
                   wire.get("x"), wire.get("p"), wire.get("u"), wire.get("g"),
                   wire.get("id"))

    def __repr__(self) -> str:
        return f"Envelope({self.kind!r}, type={self.type!r}, audience={self.audience!r})"


def envelope_id(value: Any, field: str = "id", message_type: Optional[str] = None) -> Optional[str]:
    """Validate an idempotency key: None, or 1 to 128 visible ASCII characters (no spaces)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _ID.match(value):
        raise PublishError(f"{field} must be a string of 1 to {MAX_ID_LENGTH} visible ASCII characters "
                           "(no spaces), e.g. a UUID", field, message_type)
    return value


def _keyword_dumps(obj: Any) -> str:
    # allow_nan=False: NaN and Infinity are not JSON (a browser's JSON.parse rejects them)
    return ujson.dumps(obj, ensure_ascii=False, reject_bytes=True, allow_nan=False)


def _positional_dumps(obj: Any) -> str:
    # The same options passed by position (ujson's order: ensure_ascii, encode_html_chars,
    # escape_forward_slashes, sort_keys, indent, allow_nan, reject_bytes): ujson parses keyword
    # arguments on every call, about a sixth of the cost of serializing a ~570-byte message.
    return ujson.dumps(obj, False, False, True, False, 0, False, True)


def _pick_serializer() -> Callable[[Any], str]:
    """The positional call when this ujson takes its options in the order above (checked once,
    on values where every option shows: the same text as the keyword call, the same refusals),
    else the keyword call."""
    probe = {"a/b": ["é\u2028<&>", 1, 2.5, True, None, {"k": []}]}
    try:
        if _positional_dumps(probe) != _keyword_dumps(probe):
            return _keyword_dumps
        for bad in (float("nan"), float("inf"), b"bytes"):
            try:
                _positional_dumps(bad)
            except (TypeError, ValueError, OverflowError):
                continue
            return _keyword_dumps
    except Exception:
        return _keyword_dumps
    return _positional_dumps


_serialize = _pick_serializer()


def dumps(message: Any, field: str = "message", message_type: Optional[str] = None) -> str:
    """Serialize once. Values JSON cannot hold are a PublishError, not a crash."""
    try:
        text = _serialize(message)
        if not text.isascii():  # only non-ASCII text can hold a lone surrogate (O(1) flag check)
            text.encode("utf-8")
    except (TypeError, ValueError, OverflowError, UnicodeError) as exc:
        raise PublishError(f"{field} cannot be serialized as JSON: {exc}", field, message_type) from None
    return text


def get_path(obj: Any, path: str) -> Any:
    """Read a dotted path (``"field.table_id"``) from nested dicts; ``_MISSING`` when absent."""
    if type(obj) is dict and "." not in path:  # the common case, on the publish hot path
        return obj.get(path, _MISSING)
    for part in path.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def id_list(values: Any, field: str, message_type: Optional[str]) -> List[Hashable]:
    """Canonical ids of a list, tuple or set (a PublishError naming ``field`` or ``field[i]``)."""
    return require_ids(values, field, PublishError, containers=(list, tuple, set, frozenset),
                       message_type=message_type)


def _page_type(registry: Registry, name: Any, field: str, message_type: Optional[str]) -> PageType:
    pt = registry.page_type(name)
    if pt is None:
        raise PublishError(f"page type {name!r} is not registered", field, message_type)
    return pt


def message_type_of(registry: Registry, message: Any, field: str = "message") -> MessageType:
    if type(message) is not dict and not isinstance(message, Mapping):  # dict: skip the ABC check
        raise PublishError(f"{field} must be a JSON object", field)
    name = message.get("type")
    if not isinstance(name, str):
        raise PublishError(f"{field}.type is missing or not a string", f"{field}.type")
    mt = registry.message_type(name)
    if mt is None:
        raise PublishError(f"message type {name!r} is not registered", f"{field}.type", name)
    if mt.audience == "server":
        raise PublishError(f"message type {name!r} is generated by the server and cannot be published",
                           f"{field}.type", name)
    for key in mt.payload:
        if key not in message:
            raise PublishError(f"message type {name!r} needs the payload key {key!r}",
                               f"{field}.{key}", name)
    return mt


def parse_audience(registry: Registry, to: Any, field: str = "to",
                   message_type: Optional[str] = None) -> list:
    """Turn an explicit ``to`` (same shape in Python and over HTTP) into an audience spec."""
    if not isinstance(to, Mapping) or not to:
        raise PublishError(f"{field} must be an object naming one audience", field, message_type)
    kinds = [k for k in ("page", "workspace_id", "workspace_ids", "user_ids", "all_users") if k in to]
    if len(kinds) != 1:
        raise PublishError(f"{field} must name exactly one of page, workspace_id, workspace_ids, "
                           "user_ids, all_users", field, message_type)
    kind = kinds[0]
    if kind == "page":
        pt = _page_type(registry, to["page"], f"{field}.page", message_type)
        params = pt.params_from(to)
        missing = pt.missing(params)
        if missing is not None:
            raise PublishError(f"page {pt.name!r} needs the parameter {missing!r}",
                               f"{field}.{missing}", message_type)
        return ["page", pt.group(params)]
    if len(to) != 1:
        extra = sorted(k for k in to if k != kind)[0]
        raise PublishError(f"unexpected key {extra!r} in {field}", f"{field}.{extra}", message_type)
    if kind == "workspace_id":
        return ["workspaces", [require_id(to[kind], f"{field}.workspace_id", PublishError,
                                          message_type=message_type)], None]
    if kind == "workspace_ids":
        return ["workspaces", id_list(to[kind], f"{field}.workspace_ids", message_type), None]
    if kind == "user_ids":
        return ["users", id_list(to[kind], f"{field}.user_ids", message_type)]
    if to[kind] is not True:
        raise PublishError(f"{field}.all_users must be true", f"{field}.all_users", message_type)
    return ["all"]


def _key(message: Mapping[str, Any], mt: MessageType, param: str, name: str, field: str) -> Any:
    """The routing key ``param`` of a message type, read from the payload (present, not null)."""
    path = mt.keys[param]
    value = get_path(message, path)
    if value is _MISSING or value is None:
        raise PublishError(f"message type {name!r} has no audience: payload key {path!r} is "
                           f"missing and no explicit audience was given", f"{field}.{path}", name)
    return value


def _key_id(message: Mapping[str, Any], mt: MessageType, param: str, name: str, field: str) -> Hashable:
    # On the publish hot path: the refusal's strings are built only when refusing.
    canonical = normalize_id(_key(message, mt, param, name, field))
    if canonical is None:
        path = mt.keys[param]
        raise PublishError(f"message type {name!r}: payload key {path!r} is not an id",
                           f"{field}.{path}", name)
    return canonical


def default_audience(registry: Registry, mt: MessageType, message: Mapping[str, Any],
                     name: str, field: str = "message") -> list:
    """The message type's default audience, with routing keys read from the payload."""
    audience = mt.audience
    if audience == "page":
        pt = registry.page_type(mt.page)
        if pt is None:
            pt = _page_type(registry, mt.page, f"{field}.type", name)  # raises, naming the field
        keys, declared = mt.keys, pt.parameters
        if len(declared) == 1 and len(keys) == 1 and type(message) is dict:
            # the usual case (one parameter read from one top-level key, e.g. table_id): no
            # comprehension, no loop; the same checks and refusals as below
            param = declared[0]
            path = keys.get(param)
            if path is not None and "." not in path:
                value = message.get(path)
                # absent, null, or not a valid parameter value: refused (or not) below, as before
                if value is not None and not isinstance(value, (dict, list, bool)):
                    return ["page", pt.group({param: value})]
        if len(keys) == len(declared) and all(p in keys for p in declared):
            # keys name exactly the page's parameters: one dict, not two
            params = {p: _key(message, mt, p, name, field) for p in declared}
        else:
            params = pt.params_from({param: _key(message, mt, param, name, field) for param in keys})
        missing = pt.missing(params)
        if missing is not None:
            path = mt.keys.get(missing, missing)
            raise PublishError(f"message type {name!r}: payload key {path!r} is not a valid "
                               f"{missing}", f"{field}.{path}", name)
        return ["page", pt.group(params)]
    if audience == "explicit":
        raise PublishError(f"message type {name!r} has no default audience; name one with 'to'",
                           "to", name)
    extra = None
    if mt.also_user:
        value = get_path(message, mt.also_user)
        if value is not _MISSING:
            extra = normalize_id(value)
    if audience == "workspace":
        return ["workspaces", [_key_id(message, mt, "workspace_id", name, field)], extra]
    if audience == "table_workspace":
        return ["table_workspace", _key_id(message, mt, "table_id", name, field), extra]
    return ["user_workspaces", _key_id(message, mt, "user_id", name, field), extra]


def message_envelope(registry: Registry, message: Any, to: Any = None,
                     ignore_web_socket_id: Optional[str] = None,
                     exclude_user_ids: Optional[Iterable[Any]] = None,
                     prefix: str = "", id: Optional[str] = None) -> Envelope:
    """Validate and serialize one publish. ``prefix`` prefixes error fields (``[2].``); ``id``
    is the optional idempotency key."""
    field = prefix + "message"
    mt = message_type_of(registry, message, field)
    name = message["type"]
    if to is None:
        audience = default_audience(registry, mt, message, name, field)
    else:
        audience = parse_audience(registry, to, prefix + "to", name)
    exclude = None
    if exclude_user_ids:
        exclude = id_list(list(exclude_user_ids), prefix + "exclude_user_ids", name)
    if ignore_web_socket_id is not None and not isinstance(ignore_web_socket_id, str):
        raise PublishError("ignore_web_socket_id must be a string", prefix + "ignore_web_socket_id", name)
    key = envelope_id(id, prefix + "id", name) if id is not None else None
    return Envelope(MESSAGE, name, dumps(message, field, name), audience, ignore_web_socket_id or None,
                    exclude, id=key)


def individual_envelope(registry: Registry, payloads: Any, ignore_web_socket_id: Optional[str] = None,
                        prefix: str = "", id: Optional[str] = None) -> Envelope:
    """One message per user: ``{user_id: message}``; each message is validated like a publish."""
    field = prefix + "individual"
    if not isinstance(payloads, Mapping) or not payloads:
        raise PublishError(f"{field} must be a non-empty object of user id -> message", field)
    items = []
    seen = set()
    for user, message in payloads.items():
        user_id = require_id(user, f"{field}.{user}", PublishError)
        if user_id in seen:  # 1 and "1": two copies for one connection (docs/protocol.md §5 rule 3)
            raise PublishError(f"{field} names user {user_id!r} twice", f"{field}.{user}")
        seen.add(user_id)
        message_type_of(registry, message, f"{field}.{user}")
        items.append([user_id, message["type"], dumps(message, f"{field}.{user}", message["type"])])
    if ignore_web_socket_id is not None and not isinstance(ignore_web_socket_id, str):
        raise PublishError("ignore_web_socket_id must be a string", prefix + "ignore_web_socket_id")
    key = envelope_id(id, prefix + "id")
    return Envelope(INDIVIDUAL, payloads=items, ignore=ignore_web_socket_id or None, id=key)


def directory_envelope(operation: str, args: Iterable[Any] = ()) -> Envelope:
    """A directory change (``Directory.apply(operation, args)`` on every process), validated
    first: raises the ``DirectoryError`` naming the field before anything is sent."""
    arguments = [sorted(a, key=str) if isinstance(a, (set, frozenset)) else list(a) if isinstance(a, tuple) else a
                 for a in args]  # as JSON will carry them
    Directory.check(operation, arguments)
    return Envelope(DIRECTORY, operation, dumps(arguments, "directory"))
