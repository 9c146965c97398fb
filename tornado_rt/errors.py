"""Errors that name the offending value, and the id checks that raise them.

Every refusal of bad input that can point at one value derives from :class:`FieldError`: its
``field`` is the dotted path of that value (``"[2].message.type"``, ``"workspaces.7"``), or the
option name (``"--port"``, ``"max_message_size"``), or ``None`` when no single value is at fault.
The subclasses keep their own names and bases so that existing ``except`` clauses still work:

* :class:`tornado_rt.PublishError` (a ``ValueError``): a publish was refused;
* :class:`tornado_rt.policy.DirectoryError` (a ``ValueError``): a directory change was refused;
* :class:`tornado_rt.settings.SettingError` (a ``ValueError``): a :class:`~tornado_rt.Settings`
  value was refused;
* :class:`tornado_rt.httpapi.ApiError` (a Tornado ``HTTPError``): an HTTP answer with a status;
* :class:`tornado_rt.cli.ConfigError`: ``tornado-rt serve`` refuses to start.

So one ``except FieldError`` turns any of them into an answer that names the field (the HTTP API
answers 400 with ``{"error": message, "field": field}``).
"""
from __future__ import annotations

from typing import Any, Hashable, List, Optional, Type

from .principal import normalize_id

__all__ = ["FieldError", "require_id", "require_ids"]


class FieldError(Exception):
    """A refusal naming the offending value. ``message`` is the sentence (also ``str(exc)``),
    ``field`` the dotted path or option name (or ``None``)."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.field = field


def require_id(value: Any, field: str, error: Type[FieldError] = FieldError, *,
               text: Optional[str] = None, **extra: Any) -> Hashable:
    """The canonical form of an id (:func:`tornado_rt.normalize_id`), or ``error`` naming
    ``field`` (message ``text``, default ``"<field> is not an id"``). ``extra`` goes to the error's
    constructor (e.g. ``message_type=`` of a PublishError)."""
    canonical = normalize_id(value)
    if canonical is None:
        raise error(text or f"{field} is not an id", field, **extra)
    return canonical


def require_ids(values: Any, field: str, error: Type[FieldError] = FieldError, *,
                containers: tuple = (list,), **extra: Any) -> List[Hashable]:
    """The canonical ids of a list (or of another of ``containers``); refused as a whole when it
    is not one (``field``) or item by item (``field[i]``)."""
    if not isinstance(values, containers):
        raise error(f"{field} must be a list of ids", field, **extra)
    ids = [normalize_id(value) for value in values]  # (a publish's audience: no per-item strings)
    if None in ids:
        where = f"{field}[{ids.index(None)}]"
        raise error(f"{where} is not an id", where, **extra)
    return ids
