"""What a client message means (docs/protocol.md §2), kept apart from sockets.

:func:`parse` reads one incoming text frame into page actions; the
:class:`~tornado_rt.session.Session` applies them: subscribe (``page``) after the page type's
access check, unsubscribe (``remove_page``), and the ``page_add`` / ``page_discard`` replies.
Anything that is not a JSON object with a string ``page`` or ``remove_page`` is ignored, as
Baserow does; an unknown page type, a denied access check or a missing required parameter gets
no reply at all. ``parse`` tells its caller why it ignored a frame or a page through the optional
``refused`` callback (the session logs and counts it: docs/protocol.md, "Refusals").
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import ujson

from .registry import PageType, Registry

Action = Tuple[str, PageType, dict, dict]
#: ``refused(kind, reason, context)``: ``kind`` is ``"frame"`` (the whole frame is ignored) or
#: ``"subscription"`` (its ``page`` is); ``context`` holds the client's raw values (``page``,
#: ``parameters``), to be made safe before they are logged (:func:`tornado_rt.refusals.safe_params`).
Refused = Callable[[str, str, Dict[str, Any]], None]


def parse(registry: Registry, text: Any, refused: Optional[Refused] = None) -> List[Action]:
    """The actions of one client frame: ``[("page" | "remove_page", page type, params, frame)]``
    (``frame``: the decoded object, for extension keys such as ``since``).

    ``page`` comes before ``remove_page`` when a frame holds both. A frame with neither may name
    one client action a plugin registered (e.g. ``presence``, see
    :class:`~tornado_rt.registry.ClientAction`): ``[(action name, page type, params, frame)]``.
    Garbage gives ``[]``, and ``refused`` (if given) hears why: see :data:`Refused` and
    tornado_rt.refusals's reason tables.
    """
    if not isinstance(text, str):
        if refused is not None:
            refused("frame", "binary", {})
        return []
    try:
        obj = ujson.loads(text)
    except (ValueError, OverflowError, RecursionError):
        if refused is not None:
            refused("frame", "not_json", {})
        return []
    if type(obj) is not dict:
        if refused is not None:
            refused("frame", "not_an_object", {"json_type": type(obj).__name__})
        return []
    actions: List[Action] = []
    keys: Any = ("page", "remove_page")
    if "page" not in obj and "remove_page" not in obj:
        action = next((name for name in registry.actions if name in obj), None)
        if action is not None:
            keys = (action,)
        elif refused is not None:
            refused("frame", "no_action", {"keys": list(obj)})
    for key in keys:
        if key in obj:
            page_type = registry.page_type(obj[key])
            if page_type is not None:
                params = page_type.params_from(obj)
                if not _json_safe(params):  # e.g. 1e999 or NaN: echoed back it would not be JSON
                    if refused is not None:
                        refused("subscription", "invalid_parameter", {"page": obj[key], "parameters": params})
                    return []
                actions.append((key, page_type, params, obj))
            elif key == "page" and refused is not None:
                others = {k: v for k, v in obj.items() if k not in ("page", "remove_page")}
                refused("subscription", "unknown_page_type", {"page": obj[key], "parameters": others})
    return actions


def _json_safe(params: dict) -> bool:
    """Whether ``params`` can be echoed as JSON (ujson reads 1e999 as inf and NaN as nan)."""
    try:
        ujson.dumps(params, allow_nan=False)
    except (OverflowError, ValueError):
        return False
    return True
