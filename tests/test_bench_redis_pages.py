"""bench/run.py's ``redis-pages`` scenario at a tiny size, with both ``tornado-rt`` and
``tornado-rt-redis``: the two run side by side (real ``tornado-rt serve`` processes, a real
redis-server) and are measured in alternating window pairs. No figures are asserted (no timing in
tests); what is asserted is the shape of the measurement: every window pair is one one-process
window followed by one Redis-mode window, each pair's ratio is reported with their median, the
event loops are recorded, every figure the scenario had before is still there, nothing is lost."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tools import need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "run.py")
PAIRS = 3


def test_redis_pages_runs_both_servers_in_alternating_window_pairs(tmp_path):
    need("redis-server", "redis-server")
    out = str(tmp_path / "pairs")
    env = {**os.environ, "PYTHONPATH": ROOT}  # the servers measured are this checkout
    done = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--servers", "tornado-rt,tornado-rt-redis", "--scenarios", "redis-pages",
         "--redis-pages", "10", "--redis-messages", "100", "--redis-unwatched", "20",
         "--redis-windows", str(PAIRS), "--workers", "1", "--out", out],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out + ".json") as f:
        report = json.load(f)
    assert report["meta"]["server_loop"] == "asyncio"
    assert report["meta"]["client_loop"] in ("asyncio", "uvloop")
    one = report["results"]["redis-pages"]["tornado-rt"]
    two = report["results"]["redis-pages"]["tornado-rt-redis"]
    for r in (one, two):
        assert "error" not in r, r.get("error")
        assert r["paired"] is True and r["server_alive"] is True
        assert r["server_loop"] == "asyncio" and r["client_loop"] == report["meta"]["client_loop"]
        # every copy reached its viewer: 10 pages x 1 viewer, (10 rounds + warm-up) per window
        assert r["lost"] == 0 and r["extra"] == 0 and r["order_errors"] == 0 and r["unexpected"] == 0
        assert r["drained"] is True and r["connections"] == 10
        assert r["delivered_total"] == PAIRS * 10 * 10
        assert len(r["windows"]) == PAIRS
        for key in ("a_cpu_us_per_publish", "a_cpu_us_per_publish_min", "a_cpu_us_per_publish_max",
                    "cpu_us_per_publish", "unwatched_cpu_us_per_publish"):
            assert r[key] is not None, key
    for key in ("b_cpu_us_per_publish", "redis_cpu_us_per_publish", "redis_xread_per_publish",
                "unwatched_b_cpu_us_per_publish", "unwatched_redis_cpu_us_per_publish"):
        assert two[key] is not None, key

    # The windows alternate: one process, Redis mode, one process, ... each after the other ended.
    assert [w["order"] for w in one["windows"]] == [0, 2, 4]
    assert [w["order"] for w in two["windows"]] == [1, 3, 5]
    pairs = two["pairs"]
    assert len(pairs) == PAIRS
    times = []
    for i, p in enumerate(pairs):
        assert (p["one_process_order"], p["redis_order"]) == (2 * i, 2 * i + 1)
        times += [p["one_process_started_at"], p["one_process_ended_at"], p["redis_started_at"], p["redis_ended_at"]]
        assert p["ratio"] == p["a_us"] / p["one_process_us"]
        assert p["one_process_us"] == one["windows"][i]["a_cpu_us_per_publish"]
        assert p["a_us"] == two["windows"][i]["a_cpu_us_per_publish"]
    assert times == sorted(times)
    ratios = sorted(p["ratio"] for p in pairs)
    assert two["a_ratios"] == [p["ratio"] for p in pairs]
    assert two["a_ratio_median"] == ratios[PAIRS // 2]

    with open(out + ".md") as f:
        text = f.read()
    assert f"median of {PAIRS} paired windows" in text
