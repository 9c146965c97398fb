"""What a client message means (docs/protocol.md §2), kept apart from sockets.

:func:`parse` reads one incoming text frame into page actions; the
:class:`~tornado_rt.session.Session` applies them: subscribe (``page``) after the page type's
access check, unsubscribe (``remove_page``), and the ``page_add`` / ``page_discard`` replies.
Anything that is not a JSON object with a string ``page`` or ``remove_page`` is ignored, as
Baserow does; an unknown page type, a denied access check or a missing required parameter gets
no reply at all.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import ujson

from .registry import PageType, Registry

Action = Tuple[str, PageType, dict]


def parse(registry: Registry, text: Any) -> List[Action]:
    """The page actions of one client frame: ``[("page" | "remove_page", page type, params)]``.

    ``page`` comes before ``remove_page`` when a frame holds both. Garbage gives ``[]``.
    """
    if not isinstance(text, str):
        return []
    try:
        obj = ujson.loads(text)
    except (ValueError, OverflowError, RecursionError):
        return []
    if type(obj) is not dict:
        return []
    actions: List[Action] = []
    for key in ("page", "remove_page"):
        if key in obj:
            page_type = registry.page_type(obj[key])
            if page_type is not None:
                params = page_type.params_from(obj)
                if not _json_safe(params):
                    return []  # e.g. 1e999 or NaN: echoed back it would not be JSON
                actions.append((key, page_type, params))
    return actions


def _json_safe(params: dict) -> bool:
    """Whether ``params`` can be echoed as JSON (ujson reads 1e999 as inf and NaN as nan)."""
    try:
        ujson.dumps(params, allow_nan=False)
    except (OverflowError, ValueError):
        return False
    return True
