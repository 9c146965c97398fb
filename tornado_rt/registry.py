"""The plugin registry: page types and message types by name.

A :class:`Plugin` is a name plus the :class:`PageType` and :class:`MessageType` objects it
contributes. The built-in plugins (``core``, ``database``, ``premium``) are ordinary plugins that use
only this module; a third-party plugin is exposed through the entry-point group
``tornado_rt.plugins`` (the entry point names a :class:`Plugin` or a callable returning one) or
passed to :class:`~tornado_rt.RealtimeServer` directly.
"""
from __future__ import annotations

import inspect
import logging
from importlib import metadata
from typing import (Any, Awaitable, Callable, Dict, Iterable, Mapping, Optional, Sequence,
                    Tuple, Union)


log = logging.getLogger("tornado_rt.registry")

ENTRY_POINT_GROUP = "tornado_rt.plugins"

#: Default audiences a message type may declare.
AUDIENCES = ("explicit", "page", "workspace", "table_workspace", "user_workspaces", "server")

Params = Dict[str, Any]
CanAdd = Callable[..., Union[bool, Awaitable[bool]]]


class PageType:
    """A kind of page a client subscribes to with ``{"page": name, ...parameters}``.

    ``parameters``: the declared parameter names, echoed back in ``page_add``/``page_discard``
    (values as sent; a missing one is ``None``). ``required``: those that must be present and
    not ``None`` (default: all). ``group``: a ``str.format`` template over the parameters or a
    callable ``params -> str``: connections on the same group receive the same page messages.
    ``permission_group``: template or callable, or ``None``; revoking a user from it drops the page.
    ``can_add(principal, params, policy)``: the access check, sync or async, returns a bool, or a
    falsy :class:`tornado_rt.refusals.Denied` naming why it refused (logged and counted).
    ``anonymous``: whether anonymous connections may subscribe.
    ``presence``: whether the page tracks who is looking at it (the presence extension,
    docs/protocol.md "Extensions": a subscriber may ask ``{"presence": NAME, ...parameters}``).
    A ``can_add`` that accepts a keyword argument ``web_socket_id`` also receives the id of the
    subscribing connection (what the access webhook sends to the backend).
    """

    __slots__ = ("name", "parameters", "required", "_group", "_permission_group", "can_add", "anonymous",
                 "presence", "_wants_socket")

    def __init__(self, name: str, parameters: Sequence[str], group: Union[str, Callable[[Params], str]],
                 can_add: CanAdd, permission_group: Union[str, Callable[[Params], str], None] = None,
                 required: Optional[Sequence[str]] = None, anonymous: bool = False,
                 presence: bool = False):
        self.name = name
        self.parameters = tuple(parameters)
        self.required = tuple(self.parameters if required is None else required)
        self._group = group
        self._permission_group = permission_group
        self.can_add = can_add
        self.anonymous = anonymous
        self.presence = presence
        self._wants_socket = _accepts_keyword(can_add, "web_socket_id")

    def check(self, principal: Any, params: Params, policy: Any,
              web_socket_id: Optional[str] = None) -> Union[bool, Awaitable[bool]]:
        """Run the access check ``can_add`` (passing ``web_socket_id`` when it accepts it)."""
        if self._wants_socket:
            return self.can_add(principal, params, policy, web_socket_id=web_socket_id)
        return self.can_add(principal, params, policy)

    def params_from(self, message: Mapping[str, Any]) -> Params:
        """The declared parameters of a client message or an audience, missing ones as ``None``."""
        return {p: message.get(p) for p in self.parameters}

    def missing(self, params: Params) -> Optional[str]:
        """The first required parameter that is absent or null, else ``None``."""
        for p in self.required:
            value = params.get(p)
            if value is None or isinstance(value, (dict, list, bool)):
                return p
        return None

    def group(self, params: Params) -> str:
        g = self._group
        return g(params) if callable(g) else g.format(**params)

    def permission_group(self, params: Params) -> Optional[str]:
        g = self._permission_group
        if g is None:
            return None
        return g(params) if callable(g) else g.format(**params)

    def __repr__(self) -> str:
        return f"PageType({self.name!r})"


class MessageType:
    """A message a publisher may send, with its default audience and payload contract.

    ``audience`` is one of :data:`AUDIENCES`:

    * ``"explicit"``: the publisher must name the audience (``to=...`` or individual payloads).
    * ``"page"``: page ``page`` with parameters read from the payload: ``keys`` maps each page
      parameter to a dotted payload path, e.g. ``{"table_id": "field.table_id"}``.
    * ``"workspace"``: the members of the workspace at ``keys["workspace_id"]``.
    * ``"table_workspace"``: the members of the workspace of the table at ``keys["table_id"]``.
    * ``"user_workspaces"``: the members of every workspace of the user at ``keys["user_id"]``.
    * ``"server"``: generated by tornado-rt only; publishing it is an error.

    ``payload``: top-level keys the message must carry (``type`` is always required).
    ``also_user``: dotted path of one more user id that receives the message with the default
    audience (the member added to or removed from a workspace). ``effect(ctx, message)``: side
    effect run in every process when the message is delivered, after delivery (see
    :class:`tornado_rt.router.EffectContext`); it may return an awaitable. ``aliases``: other
    names accepted for this type (the message is delivered with the name it was published with).
    """

    __slots__ = ("name", "audience", "page", "keys", "payload", "also_user", "effect", "aliases")

    def __init__(self, name: str, audience: str = "explicit", *, page: Optional[str] = None,
                 keys: Optional[Mapping[str, str]] = None, payload: Sequence[str] = (),
                 also_user: Optional[str] = None, effect: Optional[Callable[..., Any]] = None,
                 aliases: Sequence[str] = ()):
        if audience not in AUDIENCES:
            raise ValueError(f"message type {name!r}: audience must be one of {AUDIENCES}")
        if audience == "page" and not page:
            raise ValueError(f"message type {name!r}: a page audience needs page=")
        self.name = name
        self.audience = audience
        self.page = page
        self.keys = dict(keys or {})
        self.payload = tuple(payload)
        self.also_user = also_user
        self.effect = effect
        self.aliases = tuple(aliases)

    def __repr__(self) -> str:
        return f"MessageType({self.name!r}, audience={self.audience!r})"


#: Keys of a client frame that the protocol itself reads (docs/protocol.md §2); no action may take them.
RESERVED_ACTIONS = ("page", "remove_page")


class ClientAction:
    """A client request a plugin adds to the protocol: a frame ``{name: PAGE, ...parameters}``
    (e.g. ``{"presence": "table", "table_id": 10}``) of a known page type is handed to
    ``handle(session, page_type, params, frame)`` on the IOLoop thread (``params``: the page's
    declared parameters, as for ``page``; ``frame``: the whole decoded object). The handler answers
    through ``session.ctx.hub.send`` and returns None, or an awaitable when it answers later (the
    connection's next frame waits for it); it must not raise for bad input (a refused request gets no
    answer, like a refused subscription). A frame holding ``page`` or ``remove_page`` is a page
    request and never reaches an action."""

    __slots__ = ("name", "handle")

    def __init__(self, name: str, handle: Callable[[Any, PageType, Params, Dict[str, Any]], Any]):
        if name in RESERVED_ACTIONS:
            raise ValueError(f"client action {name!r} is reserved by the protocol")
        self.name = name
        self.handle = handle

    def __repr__(self) -> str:
        return f"ClientAction({self.name!r})"


class Plugin:
    """A named bundle of page types, message types and client actions."""

    def __init__(self, name: str, page_types: Iterable[PageType] = (),
                 message_types: Iterable[MessageType] = (), actions: Iterable[ClientAction] = ()):
        self.name = name
        self.page_types = list(page_types)
        self.message_types = list(message_types)
        self.actions = list(actions)

    def __repr__(self) -> str:
        return f"Plugin({self.name!r})"


class Registry:
    """Page types and message types of every loaded plugin, looked up by name."""

    def __init__(self, plugins: Iterable[Plugin] = ()):
        self.plugins: Dict[str, Plugin] = {}
        self.page_types: Dict[str, PageType] = {}
        self.message_types: Dict[str, MessageType] = {}
        self.actions: Dict[str, ClientAction] = {}
        self._owner: Dict[Tuple[str, str], str] = {}
        for plugin in plugins:
            self.add(plugin)

    def add(self, plugin: Plugin) -> None:
        """Register a plugin. A name already taken raises ``ValueError`` and registers nothing."""
        if plugin.name in self.plugins:
            raise ValueError(f"plugin {plugin.name!r} is already registered")
        claims: Dict[Tuple[str, str], str] = {}  # taken only once every name is free
        for pt in plugin.page_types:
            self._claim("page type", pt.name, plugin, claims)
        for mt in plugin.message_types:
            for name in (mt.name, *mt.aliases):
                self._claim("message type", name, plugin, claims)
        for action in plugin.actions:
            self._claim("client action", action.name, plugin, claims)
        self._owner.update(claims)
        self.plugins[plugin.name] = plugin
        for pt in plugin.page_types:
            self.page_types[pt.name] = pt
        for mt in plugin.message_types:
            for name in (mt.name, *mt.aliases):
                self.message_types[name] = mt
        for action in plugin.actions:
            self.actions[action.name] = action

    def _claim(self, kind: str, name: str, plugin: Plugin, claims: Dict[Tuple[str, str], str]) -> None:
        owner = self._owner.get((kind, name)) or claims.get((kind, name))
        if owner is not None:
            raise ValueError(f"{kind} {name!r} of plugin {plugin.name!r} is already registered by {owner!r}")
        claims[(kind, name)] = plugin.name

    def page_type(self, name: Any) -> Optional[PageType]:
        return self.page_types.get(name) if isinstance(name, str) else None

    def message_type(self, name: Any) -> Optional[MessageType]:
        return self.message_types.get(name) if isinstance(name, str) else None


def _accepts_keyword(fn: Any, name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    param = parameters.get(name)
    return param is not None and param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)


def entry_point_plugins(exclude: Iterable[str] = ()) -> list:
    """Plugins advertised in the ``tornado_rt.plugins`` entry-point group, minus ``exclude``.

    A broken entry point is logged and skipped; it never prevents the server from starting.
    """
    skip = set(exclude)
    found = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in skip:
            continue
        try:
            obj = ep.load()
            plugin = obj if isinstance(obj, Plugin) else obj()
            if not isinstance(plugin, Plugin):
                raise TypeError(f"entry point gave {type(plugin).__name__}, not a Plugin")
        except Exception:
            log.exception("could not load tornado-rt plugin %r", ep.name)
            continue
        if plugin.name not in skip:
            skip.add(plugin.name)
            found.append(plugin)
    return found
