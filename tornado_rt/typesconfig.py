"""Page types and message types declared in configuration (TOML or a dict), without Python.

The standalone server reads them from the ``[[page_types]]`` and ``[[message_types]]`` tables of
its config file and from ``--types FILE``; an embedding application calls :func:`load_types` or
:func:`load_types_file` and passes the :class:`~tornado_rt.Plugin` to ``RealtimeServer``::

    [[page_types]]
    name = "dashboard"
    parameters = ["dashboard_id"]
    group = "dashboard-{dashboard_id}"
    access = "authenticated"   # anyone | authenticated | workspace_member | webhook

    [[message_types]]
    name = "dashboard_widget_updated"
    audience = "page"          # page | workspace | table_workspace | user_workspaces | explicit
    page = "dashboard"
    keys = { dashboard_id = "dashboard_id" }
    payload = ["dashboard_id", "widget"]

Page type keys: ``name``, ``parameters`` (list), ``required`` (subset of the parameters; default
all), ``group`` and ``permission_group`` (``str.format`` templates over the parameters; plain
``{name}`` fields only), ``access`` (required):

* ``anyone``: every connection, anonymous ones too;
* ``authenticated``: every connection with a user;
* ``workspace_member``: members of the workspace named by ``workspace_of``: ``"PARAM"`` (the
  parameter holds the workspace id) or ``"table:PARAM"`` (the workspace of the table whose id the
  parameter holds), asked of the server's access policy (the directory);
* ``webhook``: the access webhook decides (``--access-url``; see :mod:`tornado_rt.webhook`);
  ``anonymous = true`` lets anonymous connections ask it too (default false).

Message type keys: ``name``, ``audience``, ``page`` (with ``audience = "page"``), ``keys`` (table
of routing key -> dotted payload path: the page parameters for ``page``; ``workspace_id``,
``table_id`` or ``user_id`` for the other audiences), ``payload`` (required top-level keys),
``also_user`` (dotted path of one more recipient user id), ``aliases`` (other accepted names).

Every error is a :class:`TypesConfigError` naming the source (file), the entry
(``page_types[0] (dashboard)``) and the key; nothing is registered from an invalid table.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import string
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set

from .principal import normalize_id
from .registry import AUDIENCES, MessageType, PageType, Params, Plugin

log = logging.getLogger("tornado_rt.typesconfig")

ACCESS = ("anyone", "authenticated", "workspace_member", "webhook")
PAGE_KEYS = ("name", "parameters", "required", "group", "permission_group", "access", "workspace_of",
             "anonymous")
MESSAGE_KEYS = ("name", "audience", "page", "keys", "payload", "also_user", "aliases")
#: Audiences a configured message type may have (``server`` is tornado-rt's own).
CONFIG_AUDIENCES = tuple(a for a in AUDIENCES if a != "server")
#: The routing key each non-page audience reads from the payload.
AUDIENCE_KEY = {"workspace": "workspace_id", "table_workspace": "table_id", "user_workspaces": "user_id"}
TOP_KEYS = ("page_types", "message_types")
#: Keys of a client's page message that cannot be parameters.
RESERVED_PARAMETERS = ("page", "remove_page")

#: ``page_check(page_name) -> can_add``: how ``access = "webhook"`` page types get their check.
WebhookFactory = Callable[[str], Callable[..., Any]]


class TypesConfigError(ValueError):
    """An invalid type declaration: ``source`` (file or ``"<dict>"``), ``entry`` (e.g.
    ``page_types[0] (dashboard)``) and ``key`` (or None) name where it is."""

    def __init__(self, source: str, entry: Optional[str], key: Optional[str], why: str):
        where = ": ".join(p for p in (source, entry, key) if p)
        super().__init__(f"{where}: {why}")
        self.source = source
        self.entry = entry
        self.key = key
        self.why = why


def load_types_file(path: str, *, webhook: Optional[WebhookFactory] = None, known_pages: Iterable[str] = (),
                    known_messages: Iterable[str] = (), name: Optional[str] = None) -> Plugin:
    """The :class:`~tornado_rt.Plugin` declared by a TOML file (see the module docstring).

    Raises :class:`TypesConfigError` for an unreadable file, bad TOML or a bad declaration."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise TypesConfigError(path, None, None, f"cannot read the file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise TypesConfigError(path, None, None, f"not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise TypesConfigError(path, None, None, "not UTF-8 text") from None
    for key in data:
        if key not in TOP_KEYS:
            raise TypesConfigError(path, None, key, f"unknown key{_hint(key, TOP_KEYS)}; a types file "
                                   "holds only [[page_types]] and [[message_types]]")
    return load_types(data, source=path, webhook=webhook, known_pages=known_pages, known_messages=known_messages,
                      name=name)


def load_types(table: Mapping[str, Any], *, source: str = "<dict>", webhook: Optional[WebhookFactory] = None,
               known_pages: Iterable[str] = (), known_messages: Iterable[str] = (),
               name: Optional[str] = None) -> Plugin:
    """The :class:`~tornado_rt.Plugin` declared by ``{"page_types": [...], "message_types": [...]}``
    (other keys of ``table`` are ignored: it may be a whole config file).

    ``webhook``: ``page_check(page_name) -> can_add`` for the page types with ``access =
    "webhook"`` (e.g. :meth:`tornado_rt.webhook.AccessWebhook.page_check`); without it such a page
    type is an error. ``known_pages``: page types registered elsewhere (the built-in ``table``,
    ...; names, or a mapping of name to :class:`~tornado_rt.PageType` to check the message types'
    keys against their parameters): message types may name them, page types may not take their names. ``known_messages``:
    message type names taken elsewhere (refused here with the entry named). ``name``: the plugin's name (default ``types:<source>``).
    Raises :class:`TypesConfigError`."""
    if not isinstance(table, Mapping):
        raise TypesConfigError(source, None, None, "the type declarations must be a table")
    pages_raw = _array(table, "page_types", source)
    messages_raw = _array(table, "message_types", source)
    page_types: List[PageType] = []
    pages: Dict[str, PageType] = {}
    known: Dict[str, Optional[PageType]] = (dict(known_pages) if isinstance(known_pages, Mapping)
                                            else dict.fromkeys(known_pages))
    for i, raw in enumerate(pages_raw):
        pt = _page_type(raw, f"page_types[{i}]", source, webhook)
        if pt.name in pages:
            raise TypesConfigError(source, _entry("page_types", i, raw), "name",
                                   f"page type {pt.name!r} is declared twice")
        if pt.name in known:
            raise TypesConfigError(source, _entry("page_types", i, raw), "name",
                                   f"page type {pt.name!r} is already registered by another plugin")
        pages[pt.name] = pt
        page_types.append(pt)
    taken = set(known_messages)
    message_types: List[MessageType] = []
    names: Set[str] = set()
    for i, raw in enumerate(messages_raw):
        mt = _message_type(raw, i, source, pages, known)
        for n in (mt.name, *mt.aliases):
            key = "name" if n == mt.name else "aliases"
            if n in names:
                raise TypesConfigError(source, _entry("message_types", i, raw), key,
                                       f"message type {n!r} is declared twice")
            if n in taken:
                raise TypesConfigError(source, _entry("message_types", i, raw), key,
                                       f"message type {n!r} is already registered by another plugin")
            names.add(n)
        message_types.append(mt)
    return Plugin(name or f"types:{source}", page_types, message_types)


# --- page types ---------------------------------------------------------------------------------------

def _page_type(raw: Any, label: str, source: str, webhook: Optional[WebhookFactory]) -> PageType:
    entry = _entry_of(label, raw)
    if not isinstance(raw, Mapping):
        raise TypesConfigError(source, label, None, "must be a table ([[page_types]])")
    _unknown_keys(raw, PAGE_KEYS, source, entry)

    def fail(key: Optional[str], why: str) -> TypesConfigError:
        return TypesConfigError(source, entry, key, why)

    name = _name(raw, "name", fail)
    parameters = _names(raw, "parameters", fail, required=True)
    if len(set(parameters)) != len(parameters):
        raise fail("parameters", "a parameter is listed twice")
    for p in parameters:
        if p in RESERVED_PARAMETERS:
            raise fail("parameters", f"{p!r} is a key of the client's message itself, not a parameter name")
    required = _names(raw, "required", fail, required=False)
    if required is None:
        required = parameters
    for p in required:
        if p not in parameters:
            raise fail("required", f"{p!r} is not one of the parameters {parameters}")
    if "group" not in raw:
        raise fail("group", "missing; a template over the parameters, such as \"NAME-{PARAM}\"")
    group = _template(raw["group"], parameters, required, fail, "group")
    permission = _template(raw["permission_group"], parameters, required, fail, "permission_group") \
        if "permission_group" in raw else None
    access = raw.get("access")
    if access is None:
        raise fail("access", f"missing; one of {', '.join(ACCESS)}")
    if access not in ACCESS:
        raise fail("access", f"must be one of {', '.join(ACCESS)}, got {access!r}")
    if "workspace_of" in raw and access != "workspace_member":
        raise fail("workspace_of", "only used with access = \"workspace_member\"")
    if "anonymous" in raw:
        if access != "webhook":
            raise fail("anonymous", "only used with access = \"webhook\" (\"anyone\" already admits anonymous "
                                    "connections)")
        if not isinstance(raw["anonymous"], bool):
            raise fail("anonymous", f"must be true or false, got {raw['anonymous']!r}")
    anonymous = access == "anyone" or bool(raw.get("anonymous", False))
    can_add: Callable[..., Any]
    if access in ("anyone", "authenticated"):
        can_add = _allow
    elif access == "workspace_member":
        can_add = _member_check(raw.get("workspace_of"), required, fail)
    else:
        if webhook is None:
            raise fail("access", "\"webhook\" needs the access webhook: start the server with --access-url URL")
        can_add = webhook(name)
    return PageType(name, parameters, _formatter(group), can_add,
                    _formatter(permission) if permission is not None else None,
                    required=required, anonymous=anonymous)


def _template(value: Any, parameters: Sequence[str], required: Sequence[str],
              fail: Callable[[Optional[str], str], TypesConfigError], key: str) -> str:
    if not isinstance(value, str) or not value:
        raise fail(key, f"must be a non-empty string template, got {value!r}")
    try:
        fields = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise fail(key, f"not a valid template: {exc}") from None
    for _, field, spec, conversion in fields:
        if field is None:
            continue
        if not field.isidentifier():
            raise fail(key, f"{{{field}}}: a field must be a plain parameter name")
        if spec or conversion:
            raise fail(key, f"{{{field}}}: conversions and format specs are not allowed")
        if field not in parameters:
            raise fail(key, f"{{{field}}} is not one of the parameters {list(parameters)}")
        if field not in required:
            raise fail(key, f"{{{field}}} names an optional parameter; a group may use required ones only")
    return value


def _formatter(template: str) -> Callable[[Params], str]:
    """Group of a page: the template over the parameters, ids in canonical form (``"7"`` and ``7``
    give the same group, as in the built-in pages)."""
    def group(params: Params) -> str:
        return template.format(**{k: _canonical(v) for k, v in params.items()})
    return group


def _canonical(value: Any) -> Any:
    canonical = normalize_id(value)
    return value if canonical is None else canonical


def _allow(principal: Any, params: Params, policy: Any) -> bool:
    return True


def _member_check(spec: Any, required: Sequence[str],
                  fail: Callable[[Optional[str], str], TypesConfigError]) -> Callable[..., Any]:
    if spec is None:
        raise fail("workspace_of", "missing; access = \"workspace_member\" needs the parameter that "
                                   "holds the workspace id (\"PARAM\") or a table id (\"table:PARAM\")")
    if not isinstance(spec, str):
        raise fail("workspace_of", f"must be a string \"PARAM\" or \"table:PARAM\", got {spec!r}")
    via_table, _, param = spec.rpartition(":")
    if via_table not in ("", "table"):
        raise fail("workspace_of", f"must be \"PARAM\" or \"table:PARAM\", got {spec!r}")
    if param not in required:
        raise fail("workspace_of", f"{param!r} is not a required parameter {list(required)}")
    table = via_table == "table"

    def can_add(principal: Any, params: Params, policy: Any) -> Any:
        value = normalize_id(params.get(param))
        if value is None or principal.user_id is None:
            return False
        if not table:
            return _is_member(principal.user_id, policy.workspace_members(value))
        workspace = policy.table_workspace(value)
        if inspect.isawaitable(workspace):
            return _member_of_table_async(principal.user_id, workspace, policy)
        return _member_of(principal.user_id, workspace, policy)

    return can_add


def _member_of(user: Any, workspace: Any, policy: Any) -> Any:
    workspace = normalize_id(workspace)
    if workspace is None:
        return False
    return _is_member(user, policy.workspace_members(workspace))


async def _member_of_table_async(user: Any, workspace: Any, policy: Any) -> bool:
    result = _member_of(user, await workspace, policy)
    return bool(await result) if inspect.isawaitable(result) else bool(result)


def _is_member(user: Any, members: Any) -> Any:
    if inspect.isawaitable(members):
        return _is_member_async(user, members)
    if isinstance(members, (set, frozenset, dict)) and user in members:
        return True
    return any(normalize_id(m) == user for m in members or ())


async def _is_member_async(user: Any, members: Any) -> bool:
    return bool(_is_member(user, await members))


# --- message types ------------------------------------------------------------------------------------

def _message_type(raw: Any, i: int, source: str, pages: Mapping[str, PageType],
                  known: Mapping[str, Optional[PageType]]) -> MessageType:
    label = f"message_types[{i}]"
    entry = _entry_of(label, raw)
    if not isinstance(raw, Mapping):
        raise TypesConfigError(source, label, None, "must be a table ([[message_types]])")
    _unknown_keys(raw, MESSAGE_KEYS, source, entry)

    def fail(key: Optional[str], why: str) -> TypesConfigError:
        return TypesConfigError(source, entry, key, why)

    name = _name(raw, "name", fail)
    audience = raw.get("audience")
    if audience is None:
        raise fail("audience", f"missing; one of {', '.join(CONFIG_AUDIENCES)}")
    if audience not in CONFIG_AUDIENCES:
        raise fail("audience", f"must be one of {', '.join(CONFIG_AUDIENCES)}, got {audience!r}")
    keys = raw.get("keys", {})
    if not isinstance(keys, Mapping):
        raise fail("keys", "must be a table of routing key = \"payload.path\"")
    for k, path in keys.items():
        if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
            raise fail(f"keys.{k}", f"must be a dotted payload path such as \"{k}\" or \"item.{k}\", got {path!r}")
    page = raw.get("page")
    if audience == "page":
        if page is None:
            raise fail("page", "missing; audience = \"page\" needs the page type")
        if not isinstance(page, str):
            raise fail("page", f"must be a page type name, got {page!r}")
        pt = pages.get(page) or known.get(page)
        if pt is None and page not in known:
            raise fail("page", f"page type {page!r} is not declared here nor registered")
        if pt is not None:
            for k in keys:
                if k not in pt.parameters:
                    raise fail(f"keys.{k}", f"{k!r} is not a parameter of page {page!r} {list(pt.parameters)}")
            for p in pt.required:
                if p not in keys:
                    raise fail("keys", f"missing the required parameter {p!r} of page {page!r}")
        elif not keys:
            raise fail("keys", f"missing; name the payload path of each parameter of page {page!r}")
    else:
        if page is not None:
            raise fail("page", "only used with audience = \"page\"")
        expected = AUDIENCE_KEY.get(audience)
        for k in keys:
            if k != expected:
                why = "an explicit audience reads no routing key" if expected is None else \
                    f"audience {audience!r} reads only {expected!r}"
                raise fail(f"keys.{k}", why)
        if expected is not None and expected not in keys:
            raise fail("keys", f"missing {expected!r}: audience {audience!r} reads it from the payload, "
                               f"e.g. keys = {{ {expected} = \"{expected}\" }}")
    payload = _names(raw, "payload", fail, required=False, identifiers=False) or []
    also_user = raw.get("also_user")
    if also_user is not None:
        if audience not in AUDIENCE_KEY:
            raise fail("also_user", "only used with the workspace, table_workspace and user_workspaces audiences")
        if not isinstance(also_user, str) or not also_user:
            raise fail("also_user", f"must be a dotted payload path, got {also_user!r}")
    aliases = _names(raw, "aliases", fail, required=False, identifiers=False) or []
    return MessageType(name, audience, page=page, keys=dict(keys), payload=payload, also_user=also_user,
                       aliases=aliases)


# --- helpers ------------------------------------------------------------------------------------------

def _array(table: Mapping[str, Any], key: str, source: str) -> List[Any]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise TypesConfigError(source, None, key, f"must be an array of tables ([[{key}]])")
    return value


def _entry(kind: str, i: int, raw: Any) -> str:
    return _entry_of(f"{kind}[{i}]", raw)


def _entry_of(label: str, raw: Any) -> str:
    name = raw.get("name") if isinstance(raw, Mapping) else None
    return f"{label} ({name})" if isinstance(name, str) and name else label


def _hint(key: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_keys(raw: Mapping[str, Any], allowed: Sequence[str], source: str, entry: str) -> None:
    for key in raw:
        if key not in allowed:
            raise TypesConfigError(source, entry, key, f"unknown key{_hint(key, allowed)}; "
                                   f"allowed: {', '.join(allowed)}")


def _name(raw: Mapping[str, Any], key: str, fail: Callable[[Optional[str], str], TypesConfigError]) -> str:
    value = raw.get(key)
    if value is None:
        raise fail(key, "missing")
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise fail(key, f"must be a non-empty string without surrounding spaces, got {value!r}")
    return value


def _names(raw: Mapping[str, Any], key: str, fail: Callable[[Optional[str], str], TypesConfigError], *,
           required: bool, identifiers: bool = True) -> Any:
    if key not in raw:
        if required:
            raise fail(key, "missing (a list of names, may be empty)")
        return None
    value = raw[key]
    if not isinstance(value, list):
        raise fail(key, f"must be a list of names, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item:
            raise fail(key, f"must be a list of non-empty strings, got {item!r}")
        if identifiers and not item.isidentifier():
            raise fail(key, f"{item!r} is not a valid parameter name (letters, digits, _)")
    return list(value)
