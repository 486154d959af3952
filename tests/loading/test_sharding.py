"""Sharded jax.Array state on 8 fake CPU devices: per-device shards written once,
replicas deduplicated, restore onto other layouts bit-exactly reading only what is needed."""

import pytest

from tests.scenarios.run import run_scenario


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_scenario("sharding_scenario.py", tmp_path_factory.mktemp("sharding"))


def test_each_distinct_shard_is_one_chunk_and_replicas_are_stored_once(result):
    assert result["chunks"]["w1"] == 8          # P('data','model') on a 4x2 mesh
    assert result["chunks"]["w2"] == 2          # P('model', None): 2 distinct shards, 4 replicas each
    assert result["chunks"]["emb"] == 4
    assert result["chunks"]["b"] == 1           # fully replicated: stored once
    assert result["stored_bytes"] == result["array_bytes"]


@pytest.mark.parametrize("layout", ["8dev_same", "4dev", "2dev", "1dev", "8dev_transposed"])
def test_restore_onto_layout_is_bit_exact_with_requested_sharding(result, layout):
    r = result["layouts"][layout]
    assert r["bit_exact"]
    saved = result["saved_specs"]
    for key, (ndev, spec) in r["specs"].items():
        assert ndev == r["devices"], key
        assert spec == saved[key][1], key


def test_explicit_shardings_pytree_onto_other_partition_specs(result):
    assert result["explicit"] == {"bit_exact": True, "w1_spec": "P(None, 'x')", "w1_devices": 4}


def test_one_device_restore_reads_each_chunk_once(result):
    r = result["one_device_read"]
    assert r["chunks_read"] == r["chunks_total"]
    assert r["bytes_read"] == r["bytes_total"]


def test_eight_device_restore_reads_each_distinct_box_once(result):
    assert result["eight_device_read_bytes"] == sum(result["array_bytes"].values())


def test_partial_restore_reads_only_selected_chunks(result):
    p = result["partial"]
    assert p["restored"] == ["w2"]
    assert p["bytes_read"] == p["w2_bytes"]
    assert p["w2_equal"] and p["w1_untouched"]
