"""A 3-node Ray cluster (ray.cluster_utils.Cluster) saving to S3 with no shared filesystem:
each node's writer uploads its own shards straight from memory (multipart, bounded part
buffers), nothing touches a local temp directory, the saving process holds at most a tenth
of the state beyond the state itself, and a writer killed mid-upload aborts the save
naming it, leaving the previous checkpoint whole and orphans that gc removes. Run in a
subprocess: one process connects to one Ray cluster."""

import tempfile
from pathlib import Path

import pytest

from tests.scenarios.run import run_scenario


@pytest.fixture(scope="module")
def scenario(s3_server, tmp_path_factory):
    tmpdir = tmp_path_factory.mktemp("tmpdir")              # TMPDIR of every process of the cluster
    ray_tmp = tempfile.mkdtemp(prefix="rs3", dir="/tmp")    # Ray's own session files (short path)
    return run_scenario(Path(__file__).with_name("s3_multinode_scenario.py"), s3_server.endpoint, ray_tmp,
                        timeout=480, env={"TMPDIR": str(tmpdir)}, cwd=str(tmpdir))


def test_each_node_writer_uploads_its_own_shards(scenario):
    assert scenario["writer_nodes"] == 3
    assert scenario["each_shard_by_its_node_writer"]
    assert scenario["restored_equal"]


def test_nothing_is_staged_on_local_disk(scenario):
    assert scenario["new_local_files"] == []


def test_saving_process_memory_is_bounded(scenario):
    """The driver streams shards through Ray's object store with at most a tenth of the state
    in flight (the part buffers live in the writers), and its own memory (anonymous and
    file-backed pages) grows by less than that. Pages of Ray's shared-memory object store
    that the puts touch show in its RSS as RssShmem: the store does not hand freed memory
    back to the next put, so that part grows by the bytes sent to writers (measured and
    reported; see docs/distributed.md)."""
    state = scenario["state_bytes"]
    assert scenario["inflight_peak"] <= 0.1 * state + (1 << 20)
    parts = scenario["peak_extra_rss_parts"]
    assert parts["RssAnon"] + parts["RssFile"] <= 0.1 * state + scenario["part_buffers_per_writer"], scenario


def test_writer_killed_mid_upload_aborts_naming_it(scenario):
    err = scenario["kill_error"]
    assert err and err.startswith("SaveAbortedError"), err
    assert scenario["victim_writer"] in err and scenario["victim_node"] in err
    assert scenario["kill_error_after_s"] < 60
    assert scenario["steps_after_kill"] == [1] and scenario["step1_still_equal"]
    assert not scenario["step2_manifest"]
    # the aborted version is marked and removed by gc; nothing of step 2 remains
    assert all(action == "remove" for _, action in scenario["leftovers_planned"])
    assert scenario["step2_objects_after_gc"] == []
