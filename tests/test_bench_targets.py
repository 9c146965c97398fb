"""bench/run.py's target lines (pure logic, no sockets): the absolute issue-4 figures are set
beside the floor measured in the same run, when the floor took part, and left alone otherwise."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import run  # noqa: E402


def _line(lines, start):
    return next(line for line in lines if line.startswith(start))


def test_the_floor_of_the_same_run_stands_beside_the_absolute_figures():
    results = {"latency": {"tornado-rt": {"p99_ms": 48.0}, "floor": {"p99_ms": 40.0}},
               "storm": {"tornado-rt": {"conns_per_s": 1900.0}, "floor": {"conns_per_s": 2500.0}}}
    lines = run.targets(results, ["tornado-rt", "floor"])
    assert _line(lines, "- p99 latency") == ("- p99 latency = 48.0 ms (target <= 25 ms): NOT met "
                                             "(the floor in this run: 40.0 ms, tornado-rt 1.20x)")
    assert _line(lines, "- connects/s") == ("- connects/s = 1,900 (target >= 2,000): NOT met "
                                            "(the connect floor in this run: 2,500/s, tornado-rt 0.76x)")


def test_without_the_floor_the_lines_are_the_targets_alone():
    results = {"latency": {"tornado-rt": {"p99_ms": 20.0}}, "storm": {"tornado-rt": {"conns_per_s": 2100.0}}}
    lines = run.targets(results, ["tornado-rt"])
    assert _line(lines, "- p99 latency") == "- p99 latency = 20.0 ms (target <= 25 ms): met"
    assert _line(lines, "- connects/s") == "- connects/s = 2,100 (target >= 2,000): met"
