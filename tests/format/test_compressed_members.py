"""Compressed checkpoints load and verify in linear time (issue #11.10).

A deflated shard's zip directory (one entry per member) used to be parsed once per member
read, so loading N small arrays cost O(N^2). Now each shard file's directory is parsed once
per load and once per ``verify``: counted here by wrapping ``zipfile.ZipFile``, never by
asserting wall time (the times are measured and printed only).
"""

from __future__ import annotations

import time
import zipfile
from collections import Counter

import numpy as np
import pytest

import shardckpt
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.testing import save_items

NUM_SHARDS = 4


@pytest.fixture
def count_zip_opens(monkeypatch):
    """Counter of ``zipfile.ZipFile`` constructions, by the shard file they open."""
    opened: Counter = Counter()
    real = zipfile.ZipFile.__init__

    def counting(self, file, *a, **kw):
        real(self, file, *a, **kw)
        name = getattr(getattr(file, "raw", file), "name", None) or getattr(self, "filename", None) or "?"
        opened[str(name)] += 1
    monkeypatch.setattr(zipfile.ZipFile, "__init__", counting)
    return opened


def many_arrays(n: int) -> dict:
    rng = np.random.default_rng(0)
    return {f"layer{i:05d}": rng.integers(0, 4, size=(8,), dtype=np.int32) for i in range(n)}


@pytest.mark.parametrize("n", [200, 4000])
def test_one_zip_directory_parse_per_file(tmp_path, count_zip_opens, n):
    tree = many_arrays(n)
    times = {}
    for compress in (False, True):
        path = save_items(tmp_path / f"c{int(compress)}", {"model": tree}, num_shards=NUM_SHARDS,
                               compress=compress, backend="threads")
        ck = Checkpoint(path)
        files = [f for f, r in ck.manifest.files.items() if r.item == "model"]
        count_zip_opens.clear()
        t = time.perf_counter()
        got = ck.read_arrays("model")
        times[compress] = time.perf_counter() - t
        assert len(got) == n and all(np.array_equal(got[k], tree[k]) for k in tree)
        opens = sum(count_zip_opens.values())
        # every shard holds arrays, so it is opened at least once: this is once per file
        assert opens == (len(files) if compress else 0), (compress, dict(count_zip_opens))

        count_zip_opens.clear()
        t = time.perf_counter()
        report = shardckpt.verify(path)
        times[("verify", compress)] = time.perf_counter() - t
        assert report.ok, report.problems
        assert sum(count_zip_opens.values()) == (len(files) if compress else 0)
    print(f"\n{n} arrays in {NUM_SHARDS} shards: load stored {times[False]:.3f}s, deflated {times[True]:.3f}s "
          f"({times[True] / max(times[False], 1e-9):.1f}x); verify stored {times[('verify', False)]:.3f}s, "
          f"deflated {times[('verify', True)]:.3f}s")


def test_partial_reads_of_a_compressed_checkpoint_open_each_file_once(tmp_path, count_zip_opens):
    tree = many_arrays(1000)
    path = save_items(tmp_path / "c", {"model": tree}, num_shards=NUM_SHARDS, compress=True)
    ck = Checkpoint(path)
    keys = sorted(tree)[::7]
    count_zip_opens.clear()
    got = ck.read_arrays("model", keys)
    assert sorted(got) == keys
    touched = {f for f, r in ck.manifest.files.items() if r.item == "model"}
    assert sum(count_zip_opens.values()) <= len(touched)      # (each file holds some of the keys)
