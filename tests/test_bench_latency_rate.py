"""bench/run.py's ``--latency-rate``: the latency scenario publishes at the rate asked for (a tiny
quick run against a real tornado-rt server process; no timing is asserted, only that the offered
rate and its label follow the option and that every message arrived), and a rate that is not
positive is refused with exit code 2 naming the option."""
from __future__ import annotations

import json
import os
import subprocess
import sys

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
