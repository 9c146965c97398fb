"""bench/redis_scale.py at a tiny size against a real redis-server and real ``tornado-rt serve``
processes: it completes, every message reaches its viewer (the harness counts them at the
WebSocket clients), and it writes its JSON and Markdown. No figures are asserted (no timing in
tests); what is asserted is that the measurement is complete and honest about loss."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tools import need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "redis_scale.py")


def test_redis_scale_tiny_run_delivers_everything_and_writes_its_report(tmp_path):
    need("redis-server", "redis-server")
    out = str(tmp_path / "scale")
    env = {**os.environ, "PYTHONPATH": ROOT}  # the servers measured are this checkout
    done = subprocess.run(
        [sys.executable, SCRIPT, "--processes", "2", "--idle-processes", "1", "--pages", "50",
         "--messages", "500", "--unwatched-messages", "100", "--workers", "1", "--out", out],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out + ".json") as f:
        result = json.load(f)
    assert result["checkout"]["tornado_rt"] == os.path.join(ROOT, "tornado_rt")
    assert result["lost"] == 0
    assert result["order_errors"] == 0
    watched = result["watched"]
    # 50 pages x 1 viewer, 10 measured rounds + the warm-up round: every copy counted at a client.
    assert watched["publishes"] == 500
    assert watched["delivery"]["connections"] == 50
    assert watched["delivery"]["received"] == 50 * 11
    assert watched["delivery"]["extra"] == 0 and watched["delivery"]["unexpected"] == 0
    procs = watched["per_process"]
    assert [p["idle"] for p in procs] == [False, True]
    assert procs[0]["accepted"] == 500 and procs[1]["accepted"] == 0
    assert procs[0]["deliveries"] == 500 and procs[1]["deliveries"] == 0
    # The servers' own count agrees with the clients': process 0 delivered every copy, process 1 none.
    assert result["api_stats"][0]["messages_delivered"] == 550
    assert result["api_stats"][1]["messages_delivered"] == 0
    assert result["unwatched"]["publishes"] == 100
    assert result["model"]["c_read_us"] is not None
    with open(out + ".md") as f:
        assert "**lost 0**" in f.read()
