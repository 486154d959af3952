"""Replica-aware restore on Ray (#13.2): N data-parallel workers on one node restoring the
same replicated state read it from storage once per node, not N times (2-node
ray.cluster_utils.Cluster, in a subprocess). The wall times of 1 and 4 workers per node are
printed, not asserted (speed is measured in benchmarks/; see docs/benchmarks.md)."""

from pathlib import Path

import pytest

from tests.scenarios.run import run_scenario


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    return run_scenario(Path(__file__).with_name("replica_restore_scenario.py"),
                        str(tmp_path_factory.mktemp("replica")), timeout=600)


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
    state = scenario["state_bytes"]
    with capsys.disabled():
        print(f"\nreplica-aware restore, {state / 2**20:.0f} MiB per worker: 1 worker/node {one:.2f} s, "
              f"4 workers/node {four:.2f} s ({four / one:.2f}x)")
    assert one > 0 and four > 0
