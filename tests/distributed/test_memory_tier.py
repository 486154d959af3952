"""The memory tier on a simulated 4-node cluster (#19): node losses, damaged replicas, a tier
too small for a save, a SIGKILLed driver. The phases run once, in a subprocess
(``memory_tier_scenario.py``, its docstring lists them); each test checks one finding."""

from pathlib import Path

import pytest

from tests.scenarios.run import run_scenario


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    return run_scenario(Path(__file__).with_name("memory_tier_scenario.py"),
                        str(tmp_path_factory.mktemp("memtier")), timeout=600)


def test_saves_commit_to_memory_with_every_shard_on_two_nodes(found):
    assert found["nodes"] == 4
    assert found["copies_per_shard"] == [2], "each shard on its node and one peer"
    assert found["memory_steps"] == [3, 4] and found["persistent_steps"] == [3] and found["all_steps"] == [3, 4]


def test_memory_per_node_stays_within_the_bound(found):
    # (1 + replicas) x the state x the steps kept, spread over the nodes, plus small files on every node
    bound = 2 * found["state_bytes"] * 2
    assert sum(found["usage"].values()) <= bound + 4 * 64 * 1024 * 2, found["usage"]
    assert max(found["usage"].values()) <= bound // 2, "one node holds far more than its share"


def test_after_one_node_loss_a_replacement_node_restores_from_memory_only(found):
    r = found["after_one_loss"]
    assert r["on_replacement"] and r["step"] == 4 and r["exact"] and r["tier"] == "memory"
    assert r["storage_read"] == 0 and r["from_persistent"] == 0, r
    d = found["driver_after_one_loss"]
    assert d["step"] == 4 and d["exact"] and d["storage_read"] == 0


def test_a_damaged_copy_is_skipped_and_two_are_our_error_naming_the_shard(found):
    assert found["one_copy_damaged"]["exact"]
    both = found["both_copies_damaged"]
    assert both["raised"] == "CorruptCheckpointError" and both["names_shard"], both


def test_two_adjacent_losses_fall_back_per_file_and_say_why(found):
    assert found["loss2_files_without_copy"] > 0, "the pair removed held both copies of some shard"
    r = found["after_two_losses"]
    assert found["persistent_before_loss2"][-1] == 6
    assert r["step"] == 6 and r["exact"] and r["tier"] == "memory", r
    assert 0 < r["from_persistent"] < r["from_memory"] + r["from_persistent"]
    assert r["storage_read"] > 0 and r["warned"] and "step 7" in r["reason"], r


def test_a_save_larger_than_the_free_memory_fails_before_writing(found):
    t = found["too_big"]
    assert t["raised"] == "CheckpointError" and "needs" in t["message"] and "free" in t["message"], t
    assert t["usage_unchanged"] and not t["listed"]


def test_a_node_without_room_refuses_its_file_and_the_save_leaves_nothing(found):
    t = found["node_full"]
    assert t["raised"] == "SaveAbortedError" and "full" in t["message"] and "do not fit" in t["message"], t
    assert t["usage_unchanged"] and not t["listed"], t


def test_a_sigkilled_driver_leaves_the_previous_step_whole_and_the_partial_one_invisible(found):
    k = found["driver_kill"]
    assert k["killed_rc"] == -9 and any(s.startswith("held step_3") for s in k["seen"]), k
    assert k["steps_after_kill"] == [1, 2], k
    assert k["resumed_step"] == 2 and k["resumed_exact"] and k["resumed_tier"] == "memory", k
