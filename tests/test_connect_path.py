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
