"""The Redis broker over a Unix domain socket (``--broker unix:///path/redis.sock``), end to end.

docs/redis.md accepts ``unix://`` URLs; on one box a Unix socket costs Redis less than TCP over
loopback (bench/README.md, ``--redis-unix``). Against a real ``redis-server`` listening on a Unix
socket only (``--port 0``: no TCP at all, so nothing can silently go over TCP): two real
``tornado-rt serve`` processes and the stand-alone ``RedisPublisher``. Non-delivery is proved
with a marker that must be the next message.
"""
import os
import subprocess
import tempfile
import time

import pytest

from redis_fixtures import (_die_with_parent, _started, marker_message, require_redis_binary,  # noqa: F401
                            require_redis_package, start_nodes)
from test_redis import connect, put_directory, rows_created  # noqa: F401


class UnixRedis:
    """A redis-server that listens on a Unix domain socket only."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tornado-rt-redis-unix-")
        self.path = os.path.join(self.dir, "redis.sock")
        self.proc = subprocess.Popen(
            [require_redis_binary(), "--port", "0", "--unixsocket", self.path, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        _started.append(self.proc)
        deadline = time.monotonic() + 10
        while not self._pong():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING on its Unix socket within 10 s")
            time.sleep(0.02)  # barrier-ok: polling until redis-server answers PING

    def _pong(self) -> bool:
        import socket

        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(0.5)
                s.connect(self.path)
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"unix://{self.path}?db=0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.gen_test(timeout=60)
async def test_two_processes_and_a_publisher_over_a_unix_socket(connect):  # noqa: F811
    require_redis_package()
    from tornado_rt.redis_broker import AsyncRedisPublisher

    redis = UnixRedis()
    nodes = []
    publisher = None
    try:
        nodes = start_nodes(redis.url, 2)
        a, b = nodes
        await put_directory(nodes)
        on_a = await connect(a, 1)
        on_b = await connect(b, 2)
        await on_a.subscribe("table", table_id=10)
        await on_b.subscribe("table", table_id=11)

        # through B's HTTP API to A's page, and through A to B's page: across the Redis socket
        first, second = rows_created(10, id=1), rows_created(11, id=2)
        await b.publish({"message": first})
        await a.publish({"message": second})
        assert await on_a.recv() == first
        assert await on_b.recv() == second

        # the stand-alone publisher on the same socket: a batch to both pages, in order
        publisher = AsyncRedisPublisher(redis.url)
        batch = [rows_created(10, id=3), rows_created(11, id=4), rows_created(10, id=5)]
        await publisher.publish_many([{"message": message} for message in batch])
        assert [await on_a.recv(), await on_a.recv()] == [batch[0], batch[2]]
        assert await on_b.recv() == batch[1]

        # nothing else arrived: the marker is next on both
        marker = marker_message()
        await a.publish({"message": marker, "to": {"all_users": True}})
        assert await on_a.recv() == marker
        assert await on_b.recv() == marker
    finally:
        if publisher is not None:
            await publisher.close()
        for node in nodes:
            node.stop()
        redis.stop()


@pytest.mark.gen_test(timeout=30)
async def test_a_connection_that_cannot_be_made_is_reported_with_its_reason(caplog):
    """A URL whose options its kind of socket refuses (TCP keepalive on a Unix socket) makes
    redis-py's connection constructor raise: start() reports that reason (not 'no reply'), and the
    reader logs it at ERROR, with the URL's password redacted."""
    require_redis_package()
    from tornado_rt import BrokerUnavailable
    from tornado_rt.redis_broker import RedisBroker

    redis = UnixRedis()
    try:
        url = f"unix://{redis.path}?db=0&password=hunter2&socket_keepalive=true"
        broker = RedisBroker(url, start_timeout=0.5)
        with caplog.at_level("DEBUG", logger="tornado_rt"):
            with pytest.raises(BrokerUnavailable) as failed:
                await broker.start()
        text = str(failed.value)
        assert "socket_keepalive" in text and "no reply" not in text, text
        assert "hunter2" not in text
        errors = [r for r in caplog.records if r.levelname == "ERROR" and "Redis stream reader" in r.getMessage()]
        assert errors, [r.getMessage() for r in caplog.records]
        assert not broker.connected
    finally:
        redis.stop()
