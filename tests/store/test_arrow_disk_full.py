"""A disk that runs full under a pyarrow-filesystem store re-saving a checkpoint (#17.4):
the old manifest was truncated, then the new one written, so a full disk left a fragment of
the new manifest and destroyed the committed checkpoint ("nothing was committed", 5 of 30
fill levels on a small tmpfs). The new manifest is now written whole beside the version's
files and moved over the old one: at every fill level the save either commits the new
version or leaves the old one whole and loadable."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shardckpt import CheckpointError, open_checkpoint
from shardckpt.testing import save_items
from tests.store.test_posix_faults import fill_until_full, small_fs  # noqa: F401 - the fixture, a real small filesystem

pafs = pytest.importorskip("pyarrow.fs")


def _tree(v: int) -> dict:
    return {"w": np.full((64, 64), v, np.float32), "b": np.arange(100) + v}


def test_a_full_disk_never_leaves_a_torn_manifest(small_fs):  # noqa: F811 - the fixture
    where, kind = small_fs
    fs = pafs.SubTreeFileSystem(str(where), pafs.LocalFileSystem())
    uri = "arrow://bucket/run/step_1"
    small = {f"m{i:04d}": float(i) for i in range(100)}
    bigger = {f"m{i:04d}": float(i) for i in range(1200)}     # the new manifest is ~10x the old one
    save_items(uri, {"state": _tree(1)}, filesystem=fs, metrics=small, backend="threads")
    ballast = where / "ballast"
    filled = fill_until_full(ballast)
    failures, reserve = 0, 0
    while True:
        os.truncate(ballast, max(0, filled - reserve))
        try:
            save_items(uri, {"state": _tree(2)}, filesystem=fs, metrics=bigger, backend="threads")
        except CheckpointError:
            failures += 1
            ck = open_checkpoint(uri, filesystem=fs)                 # the old version, whole
            assert np.array_equal(ck.read_arrays("state")["w"], _tree(1)["w"])
        else:
            os.unlink(ballast)
            assert np.array_equal(open_checkpoint(uri, filesystem=fs).read_arrays("state")["w"], _tree(2)["w"])
            break
        reserve += 1024
        assert reserve < (2 << 20), "the save never fit"
    assert failures >= 3, f"the disk was full for only {failures} attempts ({kind})"
