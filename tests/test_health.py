"""``/healthz`` tells the truth: 503 ``degraded`` while the broker is unreachable, ``ok`` again
once it is back; ``/metrics`` has the broker-connected gauge. A real ``redis-server`` is killed
under a real ``tornado-rt serve``."""
import asyncio
import time

import pytest

from redis_fixtures import Node, RedisProcess, WSClient, marker_message, require_redis_binary, token
from standalone import API_KEY, SECRET, Api, ServeProcess
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect


async def health(node):
    return await node.call("GET", "/healthz")


async def gauge(node, kind):
    status, body = await node.call("GET", "/metrics")
    assert status == 200
    text = body.decode() if isinstance(body, bytes) else str(body)
    lines = [line for line in text.splitlines() if line.startswith(f'tornado_rt_broker_connected{{kind="{kind}"}}')]
    assert len(lines) == 1, text
    return float(lines[0].rsplit(" ", 1)[1])


async def until(node, status, timeout=15.0):
    """Poll /healthz until it answers ``status`` (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        code, body = await health(node)
        if code == status:
            return body
        assert time.monotonic() < deadline, f"/healthz still answers {code} {body}, expected {status}"
        await asyncio.sleep(0.05)  # barrier-ok: bounded polling for the broker's state to change


@pytest.mark.gen_test(timeout=90)
async def test_healthz_is_503_while_redis_is_down_and_ok_when_it_is_back():
    redis = RedisProcess(require_redis_binary()).start()
    node = Node("A", redis.url).wait_started()
    try:
        assert await health(node) == (200, {"status": "ok", "broker": {"kind": "redis", "connected": True}})
        assert await gauge(node, "redis") == 1.0
        conn = await websocket_connect(HTTPRequest(f"{node.ws_url}?jwt_token={token(1)}", request_timeout=15))
        client = WSClient(conn, node)
        assert (await client.recv())["type"] == "authentication"

        redis.kill()
        assert await until(node, 503) == {"status": "degraded", "broker": {"kind": "redis", "connected": False}}
        assert await gauge(node, "redis") == 0.0
        status, body = await node.call("POST", "/api/publish", {"message": marker_message(), "to": {"user_ids": [1]}})
        assert status == 503, body  # what the health check announced

        redis.start()  # same port
        assert await until(node, 200) == {"status": "ok", "broker": {"kind": "redis", "connected": True}}
        assert await gauge(node, "redis") == 1.0
        # The WebSocket client was never touched by the outage and receives again.
        message = marker_message()
        await node.publish({"message": message, "to": {"user_ids": [1]}})
        assert await client.recv() == message
        client.close()
    finally:
        node.stop()
        redis.kill()


@pytest.mark.gen_test(timeout=30)
async def test_in_process_broker_is_always_connected(tmp_path):
    proc = ServeProcess(["serve", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY,
                         "--directory", str(tmp_path / "d.json")])
    try:
        api = Api(proc.base)
        assert await api.ok("GET", "/healthz", key=None) == {
            "status": "ok", "broker": {"kind": "in-process", "connected": True},
            "directory": {"saved": True, "save_failures": 0}}
        status, metrics, _ = await api.call("GET", "/metrics", key=None)
        assert 'tornado_rt_broker_connected{kind="in-process"} 1.0' in metrics
        assert "tornado_rt_directory_save_failures_total 0.0" in metrics
    finally:
        assert await proc.stopped() == 0, proc.output()
