"""The recovery extension end to end with the Python Subscriber (``positions=True``) against a real
``tornado-rt serve`` subprocess: after a forced reconnect it resubscribes with ``since`` and gets
exactly the messages it missed; after a server restart (a new epoch) it yields the ``page_add``
with ``recovered: false`` so the application refetches. (The JS client: tests/js/.)"""
import itertools

import pytest

from standalone import API_KEY, ServeProcess, make_token
from test_client import SERVE, FAST, States, barrier, in_thread, rows_created
from tornado_rt.client import AsyncPublisher, Subscriber

_tokens = itertools.count(1)


def fresh_token():
    return make_token(1, jti=str(next(_tokens)))  # a new token: a force disconnect is not final


@pytest.mark.gen_test(timeout=60)
async def test_subscriber_recovers_missed_messages_then_reports_an_epoch_change():
    proc = ServeProcess(SERVE)
    port = proc.port
    states = States()
    sub = Subscriber(proc.ws_url, fresh_token, on_state=states, positions=True, **FAST)
    pub = AsyncPublisher(proc.base, API_KEY)
    missed = []

    async def on_state(state, info):
        await states(state, info)
        if state == "reconnecting" and not missed:  # published while the subscriber is away
            for n in (3, 4):
                missed.append(await pub.publish(rows_created(n)))

    sub._on_state = on_state
    try:
        await sub.connect()
        added = await sub.subscribe("table", table_id=1)
        epoch = added["position"]["epoch"]
        assert added == {"type": "page_add", "page": "table", "parameters": {"table_id": 1},
                         "position": {"epoch": epoch, "offset": 0}}
        for n in (1, 2):
            assert await pub.publish(rows_created(n)) == {"published": 1, "delivered": 1}
            assert await sub.receive(10) == {**rows_created(n), "position": {"epoch": epoch, "offset": n}}

        async with AsyncPublisher(proc.base, API_KEY) as admin:
            assert await admin.disconnect([1]) == {"disconnected": 1}
        assert await sub.receive(10) == {"type": "force_disconnect"}
        await states.reached("open", 2)
        assert missed == [{"published": 1, "delivered": 0}, {"published": 1, "delivered": 0}]  # nobody was connected
        # resubscribed with since {epoch, 2}: 3 and 4 replayed, in order, once; then the live ones
        assert await sub.receive(10) == {**rows_created(3), "position": {"epoch": epoch, "offset": 3}}
        assert await sub.receive(10) == {**rows_created(4), "position": {"epoch": epoch, "offset": 4}}
        await pub.publish(rows_created(5))
        assert await sub.receive(10) == {**rows_created(5), "position": {"epoch": epoch, "offset": 5}}
        await barrier(pub, sub)
        assert sub.positions.since(next(iter(sub.positions.by_page))) == {"epoch": epoch, "offset": 5}

        await pub.close()
        assert await proc.stopped() == 0  # a restart: the in-process history is gone (new epoch)
        proc = await in_thread(ServeProcess, SERVE[:3] + [str(port)] + SERVE[4:])
        pub = AsyncPublisher(proc.base, API_KEY)
        failed = await sub.receive(30)
        assert failed["type"] == "page_add" and failed["recovered"] is False
        assert failed["position"]["epoch"] != epoch and failed["position"]["offset"] == 0
        await pub.publish(rows_created(6))
        assert await sub.receive(10) == {**rows_created(6), "position": {**failed["position"], "offset": 1}}
        await barrier(pub, sub)
    finally:
        await sub.close()
        await pub.close()
        assert await proc.stopped() == 0, proc.output()
