"""bench/redis_scale.py at a tiny size against a real redis-server and real ``tornado-rt serve``
processes: it completes, every message reaches its viewer (the harness counts them at the
WebSocket clients), and it writes its JSON and Markdown. No figures are asserted (no timing in
tests); what is asserted is that the measurement is complete and honest about loss."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict

import pytest

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


def test_redis_scale_tiny_run_over_two_redis_instances(tmp_path):
    """--shards 2: two redis-servers, every process given both URLs; every message still reaches
    its viewer, both instances carry page messages (the page groups are spread over them), and
    the per-instance figures add up to the all-instance ones."""
    need("redis-server", "redis-server")
    out = str(tmp_path / "scale-k2")
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, SCRIPT, "--processes", "2", "--idle-processes", "1", "--pages", "50",
         "--messages", "500", "--unwatched-messages", "100", "--workers", "1", "--shards", "2", "--out", out],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out + ".json") as f:
        result = json.load(f)
    assert result["config"]["shards"] == 2
    assert result["lost"] == 0 and result["order_errors"] == 0
    assert len(result["routing_since_ms_by_instance"]) == 2
    assert all(since is not None for since in result["routing_since_ms_by_instance"])
    watched = result["watched"]
    assert watched["delivery"]["received"] == 50 * 11
    assert watched["delivery"]["extra"] == 0 and watched["delivery"]["unexpected"] == 0
    assert result["api_stats"][0]["messages_delivered"] == 550
    assert result["api_stats"][1]["messages_delivered"] == 0
    instances = watched["redis_instances"]
    assert len(instances) == 2
    # 50 page groups hashed over 2 instances: both ran the publish script.
    assert all(i["commands"]["evalsha"]["calls"] >= 1 for i in instances)
    assert watched["redis_commands"]["evalsha"]["calls"] == sum(i["commands"]["evalsha"]["calls"] for i in instances)
    assert watched["redis_cpu_s"] == pytest.approx(sum(i["cpu_s"] for i in instances))
    with open(out + ".md") as f:
        text = f.read()
    assert "K=2 Redis instance(s)" in text and "| redis-server 1 | watched |" in text
    # The JSON of a run with K instances is summarizable, alone and with --project-shards.
    summary = subprocess.run([sys.executable, SCRIPT, "--summarize", out + ".json", "--project-shards", "1,2,4"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert "Redis % of one core per instance, K = 2 (all-runs fit)" in summary.stdout


# --- the pure functions of --summarize (synthetic runs: exact arithmetic, no servers) ---------------------
sys.path.insert(0, os.path.join(ROOT, "bench"))
import redis_scale  # noqa: E402


def synthetic_run(P: int, idle: int, K: Any, redis_all: float, old: bool = False) -> Dict[str, Any]:
    """A run's JSON as --summarize reads it: M = 1000 publishes spread over the active processes,
    every process idle or not; Redis CPU ``redis_all`` µs per publish, split evenly over K
    instances (``old``: the format before --shards, no ``shards`` and no ``redis_instances``)."""
    M = 1000
    active = P - idle
    per = [{"process": i, "idle": i >= active, "cpu_s": (0.0001 if i >= active else 0.05),
            "accepted": (M // active if i < active else 0), "deliveries": (M // active if i < active else 0),
            "envelopes_with_local_recipient": (M // active if i < active else 0),
            "envelopes_without_local_recipient": (M - M // active if i < active else M),
            "cpu_us_per_cluster_publish": (0.1 if i >= active else 50.0), "cpu_util": 0.001 if i >= active else 0.5}
           for i in range(P)]
    watched: Dict[str, Any] = {"publishes": M, "publishes_per_s": 10000.0, "per_process": per,
                               "redis_cpu_us_per_publish": redis_all,
                               "redis_commands": {"evalsha": {"usec_per_publish": redis_all * 0.8},
                                                  "xread": {"usec_per_publish": 0.5}}}
    config: Dict[str, Any] = {"processes": P, "idle_processes": idle, "pages": 2000, "viewers": 1}
    if not old:
        config["shards"] = K
        watched["redis_instances"] = [{"cpu_s": redis_all * M / K / 1e6, "cpu_us_per_publish": redis_all / K,
                                       "commands": {}} for _ in range(K)]
    return {"config": config, "watched": watched, "loadavg_at_start": [1.0, 1.0, 1.0], "lost": 0,
            "routing_since_ms": 1, "model": {"c_read_us": 0.1, "c_pub_us": 40.0}}


def test_shard_model_fits_a_line_per_k_and_is_linear_in_k_between_them():
    # All-instance Redis cost per publish: K = 1: 5 + 0.5 x; K = 3: 9 + 1.0 x (x = active processes).
    runs = [synthetic_run(P, 1, K, (5 + 0.5 * (P - 1)) if K == 1 else (9 + 1.0 * (P - 1)))
            for P in (2, 4, 8) for K in (1, 3)]
    model = redis_scale.shard_model(runs, calib_max_p=8)
    assert model["k_measured"] == [1, 3]
    assert model["lines"][1] == pytest.approx((5.0, 0.5))
    assert model["lines"][3] == pytest.approx((9.0, 1.0))
    # K = 2 interpolated, K = 4 extrapolated: r0 = 3 + 2 K, r1 = 0.25 + 0.25 K.
    assert redis_scale.redis_line(model, 2) == pytest.approx((7.0, 0.75))
    assert redis_scale.redis_line(model, 4) == pytest.approx((11.0, 1.25))
    # Per instance at M = 100,000/s and 16 processes with viewers: M (r0 + r1 16) / K / 1e4 % of a core.
    assert redis_scale.redis_per_instance_pct(model, 1, 16, 100000) == pytest.approx(100000 * 13.0 / 1e4)
    assert redis_scale.redis_per_instance_pct(model, 3, 16, 100000) == pytest.approx(100000 * 25.0 / 3 / 1e4)
    assert redis_scale.redis_per_instance_pct(model, 4, 16, 100000) == pytest.approx(100000 * 31.0 / 4 / 1e4)
    assert model["imbalance"] == pytest.approx(1.0)


def test_shard_model_with_one_k_measured_keeps_the_all_instance_cost_for_other_k():
    runs = [synthetic_run(P, 1, 1, 5 + 0.5 * (P - 1)) for P in (2, 4)]
    model = redis_scale.shard_model(runs, calib_max_p=4)
    assert model["k_measured"] == [1]
    assert redis_scale.redis_line(model, 4) == pytest.approx((5.0, 0.5))
    assert redis_scale.redis_per_instance_pct(model, 4, 8, 100000) == pytest.approx(100000 * 9.0 / 4 / 1e4)


def test_instance_costs_of_old_and_new_runs():
    assert redis_scale.instance_costs(synthetic_run(4, 1, 1, 6.0, old=True)) == [6.0]
    assert redis_scale.instance_costs(synthetic_run(4, 1, 3, 12.0)) == pytest.approx([4.0, 4.0, 4.0])
    assert redis_scale.shards(synthetic_run(4, 1, 1, 6.0, old=True)) == 1


def test_summarize_reads_old_runs_and_k_runs_together_and_projects_per_instance(tmp_path):
    paths = []
    for P in (2, 4):
        for K, old in ((1, True), (3, False)):
            run = synthetic_run(P, 1, K, (5 + 0.5 * (P - 1)) if K == 1 else (9 + 1.0 * (P - 1)), old=old)
            path = tmp_path / f"run-P{P}-K{K}.json"
            path.write_text(json.dumps(run))
            paths.append(str(path))
    text = redis_scale.summarize(paths, 4, [1, 3, 4])
    assert "K = 1, 3 Redis instance(s)" in text
    # Every run in the table, with its K and each instance's cost (a K = 3 run at P = 4: 12 µs in all).
    assert "| run-P4-K3 | 4 (1) | 3 | 2,000 |" in text and "| 12.0 | 4.0 / 4.0 / 4.0 |" in text
    assert "| run-P2-K1 | 2 (1) | 1 | 2,000 |" in text
    assert "K = 1: parameters" in text and "K = 3: parameters" in text
    assert "| 4 (not measured) | 11.00 / 11.00 | 1.25 / 1.25 |" in text
    # K = 3, P = 16, 100,000/s: 100,000 x (9 + 16) / 3 / 1e4 = 83%; K = 4: 100,000 x 31 / 4 / 1e4 = 78%.
    k3 = text.split("Redis % of one core per instance, K = 3 (all-runs fit)")[1]
    assert "| 16 | 8% | 42% | 83% | 167% |" in k3.split("\n\n")[1]
    k4 = text.split("Redis % of one core per instance, K = 4 (K not measured")[1]
    assert "| 16 | 8% | 39% | 78% | 155% |" in k4.split("\n\n")[1]


def test_event_model_recovers_the_costs_per_call_inbox_and_envelope():
    # Runs made from known costs: 100 µs per script call, 50 per inbox a call reaches, 4 per envelope.
    truth = {"c_call": 100.0, "c_inbox": 50.0, "c_env": 4.0}
    runs = [synthetic_run(P, 1, K, redis_scale.event_per_instance(truth, K, P - 1) * K)
            for P in (2, 4, 8) for K in (1, 3, 4)]
    model = redis_scale.event_model(runs)
    assert model == pytest.approx(truth)
    # What one instance does per cluster publish: K = 1, 6 processes with viewers, batches of 100:
    # one call reaching all 6 inboxes (1 - (5/6)^100 ~ 1), 100 envelopes: per publish 1/100 of it.
    calls, inboxes, envs = redis_scale.event_features(1, 6, 100)
    assert (calls, envs) == pytest.approx((0.01, 1.0)) and inboxes == pytest.approx(0.06, rel=1e-6)
    # K = 4: 25 envelopes per call reach 6 (1 - (5/6)^25) = 5.94 inboxes; each instance gets a
    # call of each batch (1 - (3/4)^100 ~ 1) and a quarter of the envelopes.
    calls, inboxes, envs = redis_scale.event_features(4, 6, 100)
    assert calls == pytest.approx(0.01) and envs == 0.25
    assert inboxes / calls == pytest.approx(6 * (1 - (5 / 6) ** 25), rel=1e-6)
    # One K and one P do not determine three costs.
    with pytest.raises(ValueError):
        redis_scale.event_model([synthetic_run(4, 1, 1, 10.0), synthetic_run(4, 1, 1, 11.0)])


def test_summarize_adds_the_event_model_and_its_projection_per_k(tmp_path):
    truth = {"c_call": 100.0, "c_inbox": 50.0, "c_env": 4.0}
    paths = []
    for P in (2, 4, 8):
        for K in (1, 4):
            path = tmp_path / f"run-P{P}-K{K}.json"
            path.write_text(json.dumps(synthetic_run(P, 1, K, redis_scale.event_per_instance(truth, K, P - 1) * K)))
            paths.append(str(path))
    text = redis_scale.summarize(paths, 4, [1, 4, 16])
    assert "| 100.0 | 50.0 | 4.00 |" in text
    table = text.split("Event model: Redis % of one core per instance at P = 16")[1]
    # K = 16 at P = 16: per instance (100 + 50 x inboxes) x calls + 4 / 16 µs per cluster publish.
    us = redis_scale.event_per_instance(truth, 16, 16)
    calls, inboxes, _ = redis_scale.event_features(16, 16, 100)
    assert f"| 16 | {inboxes / calls:.1f} | {us:.1f} | " in table
    assert f"{100000 * us / 1e4:,.0f}%" in table.split("| 16 |")[1].split("\n")[0]
