"""bench/run.py's latency scenario at a tiny size against real server processes. ``--latency-rate``:
the scenario publishes at the rate asked for (no timing is asserted, only that the offered rate and
its label follow the option and that every message arrived), and a rate that is not positive is
refused with exit code 2 naming the option. The ``floor`` server and ``tornado-rt-redis`` (two
processes on a real redis-server) take part in it and deliver every publish, in order."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, Tuple

from tools import need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "run.py")


def _latency_run(tmp_path: Any, servers: str) -> Tuple[Dict[str, Any], str]:
    """A quick latency run at 40 publishes/s for one second: (results by server, the Markdown table)."""
    out = str(tmp_path / "latency")
    env = {**os.environ, "PYTHONPATH": ROOT}  # the servers measured are this checkout
    done = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--servers", servers, "--scenarios", "latency",
         "--latency-rate", "40", "--duration", "1", "--workers", "1", "--out", out],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out + ".json") as f:
        results = json.load(f)["results"]["latency"]
    with open(out + ".md") as f:
        return results, f.read()


def _everything_delivered(result: Dict[str, Any], server: str) -> None:
    assert "error" not in result, (server, result.get("error"))
    assert result["publishes"] == 40, server  # one second at 40 publishes/s
    assert result["drained"] is True and result["undelivered"] == 0, server
    assert result["lost"] == 0 and result["extra"] == 0 and result["order_errors"] == 0, server


def test_latency_rate_sets_the_offered_rate_and_its_label(tmp_path):
    results, table = _latency_run(tmp_path, "tornado-rt")
    _everything_delivered(results["tornado-rt"], "tornado-rt")
    assert "@ 40 pub/s" in table


def test_latency_rate_must_be_positive():
    done = subprocess.run([sys.executable, SCRIPT, "--scenarios", "latency", "--latency-rate", "0"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert "--latency-rate" in done.stderr


def test_the_floor_server_delivers_every_publish_of_the_latency_scenario(tmp_path):
    """The latency scenario's floor (bench/servers/floor_server.py: one frame built per publish,
    one ``socket.send()`` per connection per loop iteration) is a real server: every publish
    reaches every subscriber, in order, and the table lists it."""
    results, table = _latency_run(tmp_path, "floor")
    _everything_delivered(results["floor"], "floor")
    assert "floor" in table and "p99 latency ms" in table


def test_two_processes_over_redis_deliver_every_publish_of_the_latency_scenario(tmp_path):
    """``tornado-rt-redis`` in the latency scenario: subscribers split over two real tornado-rt
    processes on a real redis-server, the paced publishes through A; every publish reaches every
    subscriber on both, in order."""
    need("redis-server", "redis-server")
    results, _ = _latency_run(tmp_path, "tornado-rt-redis")
    _everything_delivered(results["tornado-rt-redis"], "tornado-rt-redis")
    assert results["tornado-rt-redis"]["connections"] == 200  # --quick: 200 subscribers, over both
