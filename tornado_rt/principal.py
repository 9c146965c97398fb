"""Who is on the other end of a connection, and how ids are compared.

Ids arrive as JSON numbers from Python and HTTP publishers, as strings from JSON object keys
(``{"workspaces": {"1": [10]}}``) and from JWT claims. :func:`normalize_id` gives one canonical
form so that ``7`` and ``"7"`` name the same table everywhere: integers (and strings of decimal
digits) become ``int``; other non-empty strings stay strings (UUID user ids work); everything
else (``None``, booleans, floats, lists, objects) is not an id and gives ``None``.
"""
from __future__ import annotations

from typing import Any, Hashable, Mapping, Optional


def normalize_id(value: Any) -> Optional[Hashable]:
    """Return the canonical form of an id, or ``None`` when ``value`` is not an id."""
    if type(value) is int:
        return value
    if isinstance(value, str):
        if value.isdigit() and value.isascii():
            return int(value)
        if value and len(value) <= 256:
            return value
    return None


class Principal:
    """The authenticated party of one connection.

    ``user_id`` is the canonical id of the user, or ``None`` for an anonymous connection.
    ``claims`` keeps the decoded token claims (JWT) or whatever the embedding application's
    authenticator attached; tornado-rt itself reads only ``user_id``.
    """

    __slots__ = ("user_id", "claims")

    def __init__(self, user_id: Optional[Hashable], claims: Optional[Mapping[str, Any]] = None):
        self.user_id = normalize_id(user_id) if user_id is not None else None
        self.claims = claims

    @property
    def anonymous(self) -> bool:
        return self.user_id is None

    def __repr__(self) -> str:
        return "Principal(anonymous)" if self.user_id is None else f"Principal(user_id={self.user_id!r})"


ANONYMOUS = Principal(None)
