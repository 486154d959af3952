"""Real multi-host on one machine: two processes x 4 CPU devices joined by
jax.distributed; global arrays span both; one manifest; restore elsewhere."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardckpt import Checkpoint
from tests.scenarios.run import ROOT

SCRIPT = Path(__file__).parents[1] / "scenarios" / "multihost_scenario.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(work), str(port), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=400)
        lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
        assert lines, f"process failed rc={p.returncode}\n{out[-2000:]}\n{err[-6000:]}"
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return work, results


def test_both_processes_committed_one_checkpoint_each_writing_its_own_shards(run):
    work, results = run
    assert [r["count"] for r in results] == [2, 2]
    assert all(r["coordinator"] == "SharedStorageCoordinator" for r in results)
    files = results[0]["files"]
    assert files == results[1]["files"]
    writers = set(files.values())
    assert writers == {r["pid"] for r in results}, "each process wrote shards"
    assert sorted(os.listdir(work)) == ["step_1"]


def test_restore_onto_another_global_layout_in_both_processes(run):
    _, results = run
    assert all(r["restore_ok"] for r in results)


def test_single_process_without_jax_distributed_loads_full_arrays(run):
    work, _ = run
    from tests.scenarios.multihost_data import expected
    arrays = Checkpoint(work / "step_1").read_arrays("state")
    for k, v in expected().items():
        assert np.array_equal(arrays[k], v), k
    index = Checkpoint(work / "step_1").index()["state"]
    assert sum(c.nbytes for _, c in index["b"]) == expected()["b"].nbytes, "replicated array stored once"
