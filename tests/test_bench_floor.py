"""bench/run.py's ``floor`` server in the connect storm: a real server process that answers the
upgrade, checks the JWT with the same rules and sends the ``authentication`` message, so the storm
can set tornado-rt's connects against the least a Python loop does per connect. No rate is
asserted (no timing in tests): every connection of the storm must be accepted, none refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "run.py")
sys.path.insert(0, os.path.join(ROOT, "bench"))
import run  # noqa: E402


def test_the_floor_server_accepts_every_connection_of_the_storm(tmp_path):
    out = str(tmp_path / "storm")
    done = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--servers", "floor", "--scenarios", "storm",
         "--workers", "1", "--out", out],
        capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out + ".json") as f:
        results = json.load(f)["results"]["storm"]
    quick_storm = run.QUICK["storm_conns"]
    assert quick_storm > 0
    floor = results["floor"]
    assert "error" not in floor, floor.get("error")
    assert floor["connections_ok"] == quick_storm and floor["failed"] == 0
    assert floor["server_cpu_ms_per_conn"] > 0
