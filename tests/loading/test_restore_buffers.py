"""The memory a restore lands in (#21): large buffers are mappings of their own, without
NumPy's huge-page advice (whose synchronous compaction on first touch tripled the first
restore of a process), adopted by JAX without a copy and writable for donation; and a save
or load in a process that never imported Ray does not import it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shardckpt import restore, save
from shardckpt.loading.geometry import HOST_ALIGN, OWN_MAPPING_BYTES, aligned_empty

PAGE = 4096


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding ``address`` in /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("shape, dtype", [((OWN_MAPPING_BYTES // 4,), np.float32), ((1024, 2048), np.float32),
                                          ((3, 5), np.int8), ((0, 7), np.float32), ((), np.float64)])
def test_buffers_are_aligned_writable_and_sized(shape, dtype):
    a = aligned_empty(shape, dtype)
    assert a.shape == shape and a.dtype == dtype and a.flags.writeable and a.flags.c_contiguous
    if a.size:
        assert a.ctypes.data % HOST_ALIGN == 0
    if a.nbytes >= OWN_MAPPING_BYTES:
        assert a.ctypes.data % PAGE == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_large_restore_lands_in_memory_without_huge_page_advice(tmp_path):
    big = np.arange(3 << 20, dtype=np.float32).reshape(3072, 1024)     # 12 MiB
    save(tmp_path / "ck", {"big": big, "small": np.arange(10, dtype=np.float32)})
    out = restore(tmp_path / "ck", {"big": jax.ShapeDtypeStruct(big.shape, big.dtype),
                                    "small": jax.ShapeDtypeStruct((10,), np.float32)})
    np.testing.assert_array_equal(np.asarray(out["big"]), big)
    pointer = out["big"].unsafe_buffer_pointer()
    assert pointer % PAGE == 0                       # our own mapping, adopted without a copy
    assert "hg" not in _vm_flags(pointer)            # no MADV_HUGEPAGE on it


def test_restored_buffers_survive_their_host_view_and_take_donation(tmp_path):
    big = np.random.default_rng(0).standard_normal((2048, 1024)).astype(np.float32)
    save(tmp_path / "ck", {"w": big})
    out = restore(tmp_path / "ck", {"w": jax.ShapeDtypeStruct(big.shape, big.dtype)})["w"]
    step = jax.jit(lambda w: w * 2 + 1, donate_argnums=0)
    result = step(out)
    import gc
    gc.collect()
    np.testing.assert_array_equal(np.asarray(result), big * 2 + 1)
    assert jnp.all(step(result) == (big * 2 + 1) * 2 + 1)


def test_a_save_and_load_without_ray_do_not_import_it(tmp_path):
    """Ray cannot run in a process that never imported it; asking by importing it cost
    ~35 MB and ~0.5 s on the first save of every Ray-free process."""
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from flax import nnx
        from shardckpt import CheckpointManager, restore, save
        with CheckpointManager({str(tmp_path / 'run')!r}, progress=False) as mgr:
            mgr.save(1, nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
            assert mgr.latest_step == 1
            mgr.load_step(1, model=nnx.Linear(4, 4, rngs=nnx.Rngs(1)))
        save({str(tmp_path / 'tree')!r}, {{"w": np.ones(3)}})
        assert restore({str(tmp_path / 'tree')!r})["w"].tolist() == [1.0, 1.0, 1.0]
        assert "ray" not in sys.modules, "a Ray-free save or load imported ray"
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
