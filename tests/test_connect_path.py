"""Pieces of the connect path made cheaper for issue 16.3, checked against what they replace."""
import asyncio
import inspect
import re
import uuid

import pytest

from tornado_rt.hooks import isawaitable, then
from tornado_rt.principal import Principal
from tornado_rt.refusals import Denied
from tornado_rt.session import _uuid4


class AwaitablePrincipal(Principal):
    """A subclass of a 'plain' result type that is awaitable: must not be taken as ready."""

    def __await__(self):
        yield from asyncio.sleep(0).__await__()
        return self


async def _coroutine():
    return 1


def test_isawaitable_agrees_with_inspect():
    future = asyncio.Future(loop=asyncio.new_event_loop())
    coroutine = _coroutine()
    values = [None, True, 0, 1.5, "s", b"b", [], {}, (), Principal(1), Denied("x"), object(),
              AwaitablePrincipal(2), coroutine, future]
    try:
        for value in values:
            assert isawaitable(value) is inspect.isawaitable(value), value
    finally:
        coroutine.close()
        future.get_loop().close()


@pytest.mark.gen_test
async def test_then_awaits_an_awaitable_subclass_of_a_plain_type():
    answer = then(AwaitablePrincipal(3), lambda p: p.user_id)
    assert inspect.isawaitable(answer) and await answer == 3
    assert then(Principal(4), lambda p: p.user_id) == 4


def test_web_socket_ids_are_uuid4_text():
    seen = set()
    for _ in range(2000):
        text = _uuid4()
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", text)
        seen.add(text)
    assert len(seen) == 2000


def _authenticators():
    """The same JWT authenticator taken at once (its exact class) and through the general path
    (a subclass, which might be async or count differently, goes through _guarded/then)."""
    from conftest import SECRET

    from tornado_rt.auth import JWTAuthenticator
    from tornado_rt.settings import Settings

    class Sub(JWTAuthenticator):
        pass

    settings = Settings(jwt_secret=SECRET)
    return JWTAuthenticator(settings), Sub(settings)


def test_hooks_take_the_jwt_authenticator_at_once_with_the_same_outcomes(caplog):
    """Hooks.authenticate calls the JWTAuthenticator directly: a principal, a refusal (counted
    once, by the authenticator), an error (logged with the token redacted, counted as
    authenticator_error) come out as through the general path."""
    import logging

    from conftest import make_token

    from tornado_rt.hooks import Hooks
    from tornado_rt.refusals import REFUSALS

    def boom(token):
        raise RuntimeError(f"cannot read {token}")

    token = make_token(9)
    outcomes = []
    for authenticator in _authenticators():
        hooks = Hooks(authenticator, None)
        good = hooks.authenticate(token)
        assert not inspect.isawaitable(good)
        before = (REFUSALS.count("token", "malformed"), REFUSALS.count("token", "authenticator_error"),
                  REFUSALS.count("token", "authenticator_refused"))
        bad = hooks.authenticate("not-a-token")
        authenticator.check = boom  # an authenticator that raises
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            raised = hooks.authenticate(token)
        after = (REFUSALS.count("token", "malformed"), REFUSALS.count("token", "authenticator_error"),
                 REFUSALS.count("token", "authenticator_refused"))
        logged = [r.getMessage() for r in caplog.records if r.name == "tornado_rt.auth"]
        assert len(logged) == 1 and token not in logged[0] and "cannot read" in logged[0]
        outcomes.append((good.user_id, bad, raised, tuple(b - a for a, b in zip(before, after))))
    assert outcomes[0] == outcomes[1] == (9, None, None, (1, 1, 0))
