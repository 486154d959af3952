"""Replica-aware restore on Ray (#13.2): N data-parallel workers on one node restoring the
same replicated state read it from storage once per node, not N times (2-node
ray.cluster_utils.Cluster, in a subprocess). The wall times of 1 and 4 workers per node are
printed, not asserted (speed is measured in benchmarks/; see docs/benchmarks.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    work = tmp_path_factory.mktemp("replica")
    script = Path(__file__).with_name("replica_restore_scenario.py")
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, RAY_ADDRESS="", PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script), str(work)], capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"scenario failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_every_worker_restores_bit_exactly(scenario):
    assert all(r["all_ok"] for r in scenario["runs"])


def test_each_node_reads_the_state_once_whatever_the_worker_count(scenario):
    state = scenario["state_bytes"]
    for run in scenario["runs"][1:]:          # the first run also starts the cache actors
        assert run["node_read_bytes"] == [state, state], run
        assert run["worker_self_read"] == 0, "workers read through their node's cache only"


def test_wall_times_are_reported(scenario, capsys):
    one = min(r["wall_s"] for r in scenario["runs"] if r["workers_per_node"] == 1)
    four = min(r["wall_s"] for r in scenario["runs"] if r["workers_per_node"] == 4)
    with capsys.disabled():
        print(f"\nreplica-aware restore, 64 MiB per worker: 1 worker/node {one:.2f} s, "
              f"4 workers/node {four:.2f} s ({four / one:.2f}x)")
    assert one > 0 and four > 0
