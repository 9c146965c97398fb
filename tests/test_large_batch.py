"""Large publishes are worked through in slices that yield to the loop (issue 10, item 9): a big
``POST /api/publish`` batch arrives complete and in order, everything is validated before anything
is published, and other requests are served between the slices.

Why the interleaving test is deterministic: the batch's publish phase pauses at least once every
``publish_slice`` envelopes (256: at least 78 pauses for 20,000 envelopes; the time bound only
adds pauses), and each pause is one loop iteration in which every ready socket is served. The
marker request is written on a connection opened before the batch, once the subscriber has read
the batch's first message; from then on, reaching the router takes the marker a fixed, small
number of loop iterations (Tornado's HTTP reading and the handler: no thread, no timer), far fewer
than the pauses the batch still has ahead of it. (Measured: the marker lands after 11 slices,
2,816 envelopes, with the time bound disabled or not.)
"""
import asyncio
import json

import pytest
from tornado.tcpclient import TCPClient

from standalone import API_KEY, Api
from tornado_rt.httpapi import make_app

N = 20_000


@pytest.fixture
def app(server):
    return make_app(server, [API_KEY])


@pytest.fixture
def api(http_server, base_url):
    return Api(base_url)


def item(n, table_id=10, **extra):
    return {"message": {"type": "row_orders_recalculated", "table_id": table_id, "n": n, **extra}}


async def raw_publish_request(port, body):
    """An open HTTP connection and a function that writes a publish request on it."""
    stream = await TCPClient().connect("127.0.0.1", port)
    data = json.dumps(body).encode()
    head = (f"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()

    async def send():
        await stream.write(head + data)

    async def answer():
        headers = (await stream.read_until(b"\r\n\r\n")).decode("latin1")
        length = int(next(line.split(":", 1)[1] for line in headers.split("\r\n")
                          if line.lower().startswith("content-length:")))
        status = int(headers.split(" ", 2)[1])
        return status, json.loads(await stream.read_bytes(length))

    return stream, send, answer


@pytest.mark.gen_test(timeout=60)
async def test_a_large_batch_arrives_in_order_and_a_later_request_is_served_in_between(
        server, api, connect, http_port, barrier):
    assert server.publish_slice == 256
    sub = await connect(user_id=1)
    await sub.subscribe("table", table_id=10)  # the batch's page
    await sub.subscribe("table", table_id=11)  # the marker's page
    marker = {"type": "row_orders_recalculated", "table_id": 11, "marker": True}
    stream, send_marker, marker_answer = await raw_publish_request(http_port, {"message": marker})

    batch = asyncio.ensure_future(api.publish([item(n) for n in range(N)]))
    first = await sub.recv()
    assert first == item(0)["message"]
    await send_marker()  # the batch is being published: the marker must get in between its slices
    got = [first]
    while len(got) < N + 1:
        got.append(await sub.recv())
    assert await batch == {"published": N, "delivered": N}
    assert await marker_answer() == (200, {"published": 1, "delivered": 1})
    stream.close()

    at = got.index(marker)
    assert 0 < at < N, "the marker must arrive between the batch's first and last message"
    del got[at]
    assert [m["n"] for m in got] == list(range(N))  # complete, in order
    await barrier(sub)


@pytest.mark.gen_test(timeout=60)
async def test_an_invalid_envelope_deep_in_a_large_batch_publishes_nothing(server, api, connect, barrier):
    sub = await connect(user_id=1)
    await sub.subscribe("table", table_id=10)
    batch = [item(n) for n in range(N)]
    batch[N - 100] = {"message": {"type": "no_such_type"}}
    status, body, _ = await api.call("POST", "/api/publish", batch)
    assert status == 400 and body["field"] == f"[{N - 100}].message.type", body
    # an invalid envelope early and a syntax error at the end: the body is refused as JSON, as
    # when it was parsed in one go before any envelope was looked at
    batch[3] = {"message": {"type": "no_such_type"}}
    status, body, _ = await api.call("POST", "/api/publish", raw=json.dumps(batch) + " ]")
    assert status == 400 and body["field"] is None and "not valid JSON" in body["error"], body
    await barrier(sub)  # nothing of either batch was published
    assert server.stats()["messages_published"] == 1  # the barrier's marker only


@pytest.mark.gen_test(timeout=60)
async def test_concurrent_batches_each_keep_their_order(server, api, connect, barrier):
    sub = await connect(user_id=1)
    await sub.subscribe("table", table_id=10)
    half = N // 4
    first = asyncio.ensure_future(api.publish([item(n, source="a") for n in range(half)]))
    second = asyncio.ensure_future(api.publish([item(n, source="b") for n in range(half)]))
    got = [await sub.recv() for _ in range(2 * half)]
    assert await first == {"published": half, "delivered": half}
    assert await second == {"published": half, "delivered": half}
    for source in ("a", "b"):
        assert [m["n"] for m in got if m["source"] == source] == list(range(half))
    await barrier(sub)
