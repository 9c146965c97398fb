"""The one boundary between tornado-rt and the application's hooks, which may be sync or async.

The authenticator, the access policy's methods, a page type's ``can_add`` and a message type's
side effect may each return a value or an awaitable of one. This module is the only place that
tells the two apart (:func:`isawaitable`). Everything else composes results with two
helpers and never asks:

* :func:`then` ``(value, fn)``: ``fn(value)`` now when ``value`` is ready, else an awaitable that
  awaits it, applies ``fn`` and awaits what ``fn`` returns in turn.
* :func:`gather` ``(values)``: a list now when every value is ready, else an awaitable of it.

At the I/O edge, :func:`pending` turns a result into "None: done" or "an awaitable to wait for
before the next step" (Tornado's ``on_message`` contract; the router's ordered queue).

:class:`Hooks` wraps the application's hooks once per server: it catches and logs their errors
(an authenticator error refuses the connection without the token reaching the log, an access
check error refuses the subscription) and composes the access policy's calls for an audience.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Awaitable, Callable, Hashable, Iterable, List, Optional, Set, TypeVar, Union

from .auth import JWTAuthenticator, log_authenticator_error, refuse_token, to_principal
from .principal import Principal, normalize_id
from .refusals import Denied

log = logging.getLogger("tornado_rt.hooks")

T = TypeVar("T")
R = TypeVar("R")
MaybeAwaitable = Union[T, Awaitable[T]]


#: Types whose instances are never awaitable: told apart by one set look-up instead of
#: ``inspect.isawaitable``'s three isinstance checks (one of them an ABC's). Exact types only (a
#: subclass may define ``__await__``).
_READY = frozenset({type(None), bool, int, float, str, bytes, list, dict, tuple, Principal, Denied})


def isawaitable(value: Any) -> bool:
    """``inspect.isawaitable(value)``, at once for the plain results hooks usually give."""
    return value.__class__ not in _READY and inspect.isawaitable(value)


def then(value: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to ``value`` now, or once ``value`` (an awaitable) is ready."""
    if not isawaitable(value):
        return fn(value)

    async def later() -> Any:
        result = fn(await value)
        if isawaitable(result):
            result = await result
        return result
    return later()


def gather(values: Iterable[Any]) -> Any:
    """The list of ``values``, each resolved in order; an awaitable of it if any is awaitable."""
    values = list(values)
    if not any(isawaitable(v) for v in values):
        return values

    async def later() -> List[Any]:
        return [await v if isawaitable(v) else v for v in values]
    return later()


def pending(value: Any) -> Optional[Awaitable[Any]]:
    """``value`` if it still has to be awaited, else None (the step is done)."""
    return value if isawaitable(value) else None


def _guarded(call: Callable[[], Any], fallback: Any, on_error: Callable[[], None]) -> Any:
    """``call()``, or ``fallback`` after ``on_error()`` (inside the except) if it raises, now or
    when awaited."""
    try:
        value = call()
    except Exception:
        on_error()
        return fallback
    if not isawaitable(value):
        return value

    async def later() -> Any:
        try:
            return await value
        except Exception:
            on_error()
            return fallback
    return later()


_RAISED = object()  # what an authenticator that raised answers (already logged and counted)


class Hooks:
    """The application's hooks of one server, normalised (see the module docstring)."""

    __slots__ = ("authenticator", "policy")

    def __init__(self, authenticator: Optional[Callable[[str], Any]], policy: Any):
        self.authenticator = authenticator
        self.policy = policy

    def authenticate(self, token: str) -> MaybeAwaitable[Optional[Principal]]:
        """The principal of ``token``, or None when refused (or when the authenticator raised:
        logged with the token redacted)."""
        authenticator = self.authenticator
        if authenticator is None:
            return None
        if authenticator.__class__ is JWTAuthenticator:  # synchronous, counts its own refusals,
            try:                                         # answers a Principal or None: at once
                return authenticator(token)
            except Exception:
                log_authenticator_error(token)
                return None
        result = _guarded(lambda: authenticator(token), _RAISED, lambda: log_authenticator_error(token))
        # An authenticator that counts its own refusals (JWTAuthenticator: reports_refusals) is not
        # counted twice; an embedder's None is counted here, an error already was.
        counts_itself = getattr(authenticator, "reports_refusals", False)

        def judged(answer: Any) -> Optional[Principal]:
            if answer is _RAISED:
                return None
            principal = to_principal(answer)
            if principal is None and not counts_itself:
                refuse_token("authenticator_refused")
            return principal
        return then(result, judged)

    @staticmethod
    def can_add(page_type: Any, principal: Principal, params: dict, policy: Any,
                web_socket_id: Optional[str] = None) -> MaybeAwaitable[bool]:
        """The page type's access check (``PageType.check``: ``web_socket_id`` is passed to a
        ``can_add`` that asks for it); an error refuses the subscription (logged)."""
        def failed() -> None:
            log.exception("access check of page %r failed; subscription refused", page_type.name)
        return _guarded(lambda: page_type.check(principal, params, policy, web_socket_id), Denied("access_error"),
                        failed)

    def members(self, audience: list) -> MaybeAwaitable[Set[Hashable]]:
        """The user ids of a membership audience (``workspaces``, ``table_workspace``,
        ``user_workspaces``), plus its extra user. Policy errors propagate (the router drops the
        envelope and logs)."""
        how = audience[0]
        policy = self.policy
        extra = audience[2] if len(audience) > 2 else None
        if how == "workspaces":
            workspaces: Any = audience[1]
        elif how == "table_workspace":
            workspaces = then(policy.table_workspace(audience[1]), lambda ws: [] if ws is None else [ws])
        else:  # user_workspaces
            workspaces = policy.user_workspaces(audience[1])

        def of_workspaces(found: Any) -> Any:
            return then(gather(policy.workspace_members(normalize_id(ws)) for ws in found or ()),
                        lambda lists: _union(lists, extra))
        return then(workspaces, of_workspaces)

    @staticmethod
    def effect(effect: Callable[..., Any], ctx: Any, message: dict) -> MaybeAwaitable[Any]:
        """A message type's side effect (its errors propagate to the router, which logs them)."""
        return effect(ctx, message)


def _union(lists: Iterable[Any], extra: Any) -> Set[Hashable]:
    members: Set[Hashable] = set()
    for found in lists:
        members.update(normalize_id(m) for m in found or ())
    if extra is not None:
        members.add(extra)
    return members
