"""Box arithmetic of a restore: which box of each array a device needs, which stored chunk
fills which part of it, and the aligned host buffers they land in. Pure functions, no I/O."""

from __future__ import annotations

import math
import mmap
from typing import Any, Callable

import jax
import numpy as np

from shardckpt.errors import StructureMismatchError
from shardckpt.format.shard import ChunkRecord, ReadTarget
from shardckpt.tree import ArraySpec, FlatTree

Box = tuple[tuple[int, ...], tuple[int, ...]]   # (offset, shape) in stored coordinates
HOST_ALIGN = 64     # XLA's CPU client adopts host buffers aligned to this without copying
OWN_MAPPING_BYTES = 4 << 20   # from this size a restore buffer is its own mapping (no huge-page advice)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose data is HOST_ALIGN-aligned, so ``jax.device_put(...,
    may_alias=True)`` on CPU wraps it instead of copying: restore copies each byte once
    (file -> this buffer) and peaks at the state's size, not twice it.

    Buffers of ``OWN_MAPPING_BYTES`` or more are anonymous mappings of their own (page
    aligned, unmapped when the array is freed), not NumPy allocations: NumPy advises huge
    pages (``MADV_HUGEPAGE``) for every allocation of 4 MiB or more, and where transparent
    huge pages defragment on advice (``defrag=madvise``, the kernel's default) each first
    touch of such memory compacts memory synchronously. A restore touches every byte of
    fresh memory once, so that advice tripled the first restore of a process (the resume):
    few_huge 0.44 s -> 0.12 s, lm 1.01 s -> 0.62 s in a fresh process on the #21 VM. The
    price: repeated restores in one process fault their pages in again, where NumPy's heap
    reused huge pages (bench_21: few_huge warm 0.08 -> 0.15 s, lm 0.28 -> 0.42 s); see
    docs/benchmarks.md for what would keep both."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes >= OWN_MAPPING_BYTES:
        return np.frombuffer(mmap.mmap(-1, nbytes), dtype, count=count).reshape(shape)
    raw = np.empty(nbytes + HOST_ALIGN, np.uint8)
    start = (-raw.ctypes.data) % HOST_ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def concrete_sharding(sharding: Any, key: str, where: str):
    """A sharding on real devices: an abstract target from ``nnx.eval_shape`` under
    ``jax.sharding.set_mesh`` names an AbstractMesh, bound here to the mesh in force."""
    if sharding is None or not isinstance(getattr(sharding, "mesh", None), jax.sharding.AbstractMesh):
        return sharding
    mesh = jax.sharding.get_mesh()
    if mesh is None or getattr(mesh, "empty", False) or dict(mesh.shape) != dict(sharding.mesh.shape):
        raise StructureMismatchError(
            f"{where}: {key!r} targets an abstract mesh {dict(sharding.mesh.shape)}; restore under "
            "`with jax.sharding.set_mesh(mesh):` with that mesh, or pass shardings=")
    return jax.sharding.NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)


def sharding_resolver(shardings: Any) -> Callable[[str], Any]:
    """``shardings=`` as key -> Sharding: one Sharding for all, a dict by dotted key, a
    callable, or a pytree shaped like the target (e.g. ``nnx.get_named_sharding``)."""
    if shardings is None:
        return lambda key: None
    if isinstance(shardings, jax.sharding.Sharding):
        return lambda key: shardings
    if callable(shardings) and not isinstance(shardings, dict):
        return shardings
    if isinstance(shardings, dict) and all(isinstance(k, str) and "." in k for k in shardings):
        return shardings.get
    by_key = {k: v for k, v in FlatTree.of(shardings).values().items()
              if isinstance(v, jax.sharding.Sharding)}
    return by_key.get


def full_box(spec: ArraySpec) -> Box:
    return (0,) * len(spec.stored_shape), tuple(spec.stored_shape)


def device_boxes(spec: ArraySpec, sharding) -> dict[Any, Box]:
    """The stored-coordinate box each addressable device of ``sharding`` needs (key data
    arrays carry their trailing key dimension whole)."""
    extra = tuple(spec.stored_shape[len(spec.shape):])
    out = {}
    for device, index in sharding.addressable_devices_indices_map(spec.shape).items():
        starts, sizes = [], []
        for sl, dim in zip(index, spec.shape):
            start, stop, _ = sl.indices(dim)
            starts.append(start)
            sizes.append(stop - start)
        out[device] = (tuple(starts) + (0,) * len(extra), tuple(sizes) + extra)
    return out


def chunk_target(chunk: ChunkRecord, dest: np.ndarray, box: Box) -> ReadTarget | None:
    """How ``chunk`` fills the part of ``dest`` (holding ``box``) it overlaps: a direct read
    when the chunk lies whole in a contiguous region, else a copy of the overlap."""
    hit = box_overlap(chunk.offset, chunk.shape, box[0], box[1])
    if hit is None:
        return None
    offset, shape = hit
    dest_sl = tuple(slice(o - b, o - b + n) for o, b, n in zip(offset, box[0], shape))
    view = dest[dest_sl] if dest_sl else dest
    whole = shape == tuple(chunk.shape)
    if whole and view.flags.c_contiguous:
        return ReadTarget(chunk, view)
    sub = tuple(slice(o - c, o - c + n) for o, c, n in zip(offset, chunk.offset, shape))
    return ReadTarget(chunk, view, sub=sub)


def box_overlap(a_offset, a_shape, b_offset, b_shape):
    """Intersection of two boxes as (offset, shape), or None when they do not meet."""
    lo = [max(a, b) for a, b in zip(a_offset, b_offset)]
    hi = [min(a + n, b + m) for a, n, b, m in zip(a_offset, a_shape, b_offset, b_shape)]
    if any(h < l for l, h in zip(lo, hi)):
        return None
    if any(h == l for l, h in zip(lo, hi)) and math.prod(a_shape) and math.prod(b_shape):
        return None
    return tuple(lo), tuple(h - l for l, h in zip(lo, hi))
