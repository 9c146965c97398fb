"""bench/run.py's ``--latency-rate``: the latency scenario publishes at the rate asked for (a tiny
quick run against a real tornado-rt server process; no timing is asserted, only that the offered
rate and its label follow the option and that every message arrived), and a rate that is not
positive is refused with exit code 2 naming the option."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tools import need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "run.py")


def test_latency_rate_sets_the_offered_rate_and_its_label(tmp_path):
    out = str(tmp_path / "rate")
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--servers", "tornado-rt", "--scenarios", "latency",
         "--latency-rate", "40", "--duration", "1", "--workers", "1", "--out", out],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out + ".json") as f:
        report = json.load(f)
    result = report["results"]["latency"]["tornado-rt"]
    assert "error" not in result, result.get("error")
    assert result["publishes"] == 40  # one second at 40 publishes/s
    assert result["drained"] is True and result["undelivered"] == 0
    with open(out + ".md") as f:
        assert "@ 40 pub/s" in f.read()


def test_latency_rate_must_be_positive():
    done = subprocess.run([sys.executable, SCRIPT, "--scenarios", "latency", "--latency-rate", "0"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert "--latency-rate" in done.stderr


def test_the_floor_server_delivers_every_publish_of_the_latency_scenario(tmp_path):
    """The latency scenario's floor (bench/servers/floor_server.py: one frame built per publish,
    one ``socket.send()`` per connection per loop iteration) is a real server: every publish
    reaches every subscriber, in order, and the table lists it beside tornado-rt."""
    out = str(tmp_path / "floor")
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--servers", "tornado-rt,floor", "--scenarios", "latency",
         "--latency-rate", "40", "--duration", "1", "--workers", "1", "--out", out],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out + ".json") as f:
        report = json.load(f)
    for server in ("tornado-rt", "floor"):
        result = report["results"]["latency"][server]
        assert "error" not in result, (server, result.get("error"))
        assert result["publishes"] == 40, server
        assert result["drained"] is True and result["undelivered"] == 0, server
        assert result["lost"] == 0 and result["extra"] == 0 and result["order_errors"] == 0, server
    with open(out + ".md") as f:
        table = f.read()
    assert "floor" in table and "p99 latency ms" in table


def test_two_processes_over_redis_deliver_every_publish_of_the_latency_scenario(tmp_path):
    """``tornado-rt-redis`` in the latency scenario: subscribers split over two real tornado-rt
    processes on a real redis-server, the paced publishes through A; every publish reaches every
    subscriber on both, in order."""
    need("redis-server", "redis-server")
    out = str(tmp_path / "redis")
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--servers", "tornado-rt-redis", "--scenarios", "latency",
         "--latency-rate", "40", "--duration", "1", "--workers", "1", "--out", out],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out + ".json") as f:
        result = json.load(f)["results"]["latency"]["tornado-rt-redis"]
    assert "error" not in result, result.get("error")
    assert result["publishes"] == 40
    assert result["drained"] is True and result["undelivered"] == 0
    assert result["lost"] == 0 and result["extra"] == 0 and result["order_errors"] == 0
    assert result["connections"] == 200  # --quick: 200 subscribers, over both processes
