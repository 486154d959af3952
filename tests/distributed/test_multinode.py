"""Multi-node behaviour on ray.cluster_utils.Cluster (3 nodes, 1 CPU each), run in a
subprocess because one process can be connected to only one Ray cluster."""

from pathlib import Path

import pytest

from tests.scenarios.run import run_scenario


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    return run_scenario(Path(__file__).with_name("multinode_scenario.py"), str(tmp_path_factory.mktemp("multinode")),
                        timeout=420)


def test_shards_written_by_distinct_writers_on_distinct_nodes(scenario):
    assert scenario["nodes_alive"] == 3
    assert len(scenario["writer_nodes"]) == 3
    assert len(scenario["writer_pids"]) == 3


def test_node_removed_mid_save_gives_named_error_and_nothing_visible(scenario):
    err = scenario["error"]
    assert err and err.startswith("SaveAbortedError"), err
    assert scenario["victim_writer"] and scenario["victim_writer"][0] in err
    assert scenario["victim_node"] in err
    assert scenario["visible_after_failure"] == ["step_1"]


def test_following_save_succeeds_on_the_surviving_nodes(scenario):
    assert len(scenario["retry_writer_nodes"]) == 2
    assert scenario["victim_node"] not in scenario["retry_writer_nodes"]
    assert scenario["restored_equal"]
