"""Exact tiling: the chunks of an array cover it exactly once (no gap, no overlap).

Pure geometry on int64 box arrays, exact for every count and bounded in time: the index
validator runs it on every array of every checkpoint it reads.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from shardckpt.errors import CorruptCheckpointError
from shardckpt.format.shard import ChunkRecord

GRID_CELLS_PER_BOX = 8          # a painted grid has at most this many cells per chunk (+64 Ki)


GRID_MIN_CELLS = 1 << 16


SWEEP_BUDGET = 1 << 28          # coordinate comparisons the irregular sweep may make


def check_tiling(key: str, shape: tuple[int, ...], chunks: list[ChunkRecord], where: str) -> None:
    """The chunks of one array must cover it exactly once (see ``check_boxes``)."""
    nd = len(shape)
    offs = np.array([c.offset for c in chunks], dtype=np.int64).reshape(len(chunks), nd)
    shps = np.array([c.shape for c in chunks], dtype=np.int64).reshape(len(chunks), nd)
    check_boxes(key, tuple(shape), offs, shps, where)


def check_inside(what: str, offs: np.ndarray, shps: np.ndarray, shape: tuple[int, ...]) -> None:
    """Every box ``offs[i] .. offs[i] + shps[i]`` lies inside an array of ``shape`` (no
    int64 overflow decides: offsets and sizes are compared with the shape first)."""
    if not len(offs):
        return
    g = np.array(shape, dtype=np.int64).reshape(offs.shape[1])
    bad = np.flatnonzero(((offs < 0) | (shps < 0) | (offs > g) | (shps > g) | (offs + shps > g)).any(axis=1))
    if bad.size:
        i = int(bad[0])
        raise CorruptCheckpointError(f"{what}: box {tuple(offs[i].tolist())}+{tuple(shps[i].tolist())} "
                                     f"lies outside the array {tuple(shape)}")


def check_boxes(key: str, shape: tuple[int, ...], offs: np.ndarray, shps: np.ndarray, where: str) -> None:
    """Boxes ``offs[i] .. offs[i] + shps[i]`` (int64 arrays of shape (n, ndim)) tile the
    array ``shape`` exactly: each inside it, no element covered twice, none left out.

    Exact for every count. Inside the bounds, with volumes summing to the array's,
    "no two boxes overlap" is equivalent to an exact tiling, so only disjointness is
    tested, on the coordinate-compressed grid (the distinct box boundaries of each dim):

    * every box is one cell of that grid (regular layouts: what sharding produces): the
      boxes are disjoint iff their cell coordinates are distinct; a sort,
      O(d * n log n);
    * the grid has at most ``8 n + 65536`` cells (a regular grid with some boxes merged or
      split, e.g. replicated shards split by row): each box is painted into a bitmap of
      cells, stopping at the first cell painted twice; O(d * n log n + cells);
    * otherwise (irregular layouts): a sweep along the dimension whose boxes are cut by
      the fewest sweep lines, comparing each box, vectorised, with the boxes still open at
      its start; O(d * n log n + d * sum of open boxes), worst case O(d * n^2). That sum is
      computed before the sweep; a layout needing more than 2^28 comparisons (no shardckpt
      writer produces one) is refused as too irregular rather than validated for minutes.
    """
    n, nd = offs.shape
    what = f"{where}: chunks of {key!r}"
    if nd != len(shape):
        raise CorruptCheckpointError(f"{what}: chunk boxes have {nd} dimensions, the array {len(shape)}")
    check_inside(what, offs, shps, tuple(shape))
    total = math.prod(shape)
    if total == 0:       # nothing to cover; every box inside is empty
        if not n:
            raise CorruptCheckpointError(f"{what}: cover 0 of 0 elements (an array needs at least one chunk)")
        return
    # all dims >= 1 and the product <= MAX_ELEMENTS: a box's volume never overflows
    vols = shps.prod(axis=1) if nd else np.ones(n, np.int64)
    if float(vols.sum(dtype=np.float64)) > 2.0 * total:
        raise CorruptCheckpointError(f"{what}: cover more than {total} elements (overlapping chunks)")
    covered = int(vols.sum())                          # < 2^52: no int64 overflow
    if covered != total:
        raise CorruptCheckpointError(f"{what}: cover {covered} of {total} elements")
    keep = vols > 0
    offs, shps = offs[keep], shps[keep]
    m = offs.shape[0]
    if m <= 1:
        return
    s0 = shps[0]
    if (shps == s0).all() and not (offs % s0).any():
        # one chunk shape, offsets on its grid (what sharding produces): the boxes are cells
        # of that grid, disjoint iff their cell numbers differ (fewer than 2^50 cells)
        stride, strides = 1, []
        for dim, step in zip(reversed(shape), reversed(s0.tolist())):
            strides.append(stride)
            stride *= -(-dim // step)
        code = (offs // s0) @ np.array(strides[::-1], dtype=np.int64)
        code.sort()
        if not (code[1:] == code[:-1]).any():
            return
        # an overlap: found and named by the general test below
    ends = offs + shps
    lo = np.empty_like(offs)
    hi = np.empty_like(offs)
    ncells = []
    for k in range(nd):
        c = np.unique(np.concatenate([offs[:, k], ends[:, k]]))
        lo[:, k] = np.searchsorted(c, offs[:, k])
        hi[:, k] = np.searchsorted(c, ends[:, k])
        ncells.append(len(c) - 1)
    if ((hi - lo) == 1).all():
        _check_distinct_cells(what, lo, offs)
        return
    cells = 1
    limit = GRID_CELLS_PER_BOX * m + GRID_MIN_CELLS
    for c in ncells:
        cells *= c
        if cells > limit:
            break
    if cells <= limit:
        _paint(what, lo, hi, ncells, offs)
    else:
        _sweep(what, offs, ends)


def _overlap_error(what: str, offs: np.ndarray, i: int, j: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{what}: overlap at {tuple(offs[i].tolist())} and {tuple(offs[j].tolist())} "
                                  "(and so leave elements uncovered)")


def _check_distinct_cells(what: str, cells: np.ndarray, offs: np.ndarray) -> None:
    order = np.lexsort(cells.T[::-1])
    s = cells[order]
    dup = np.flatnonzero((s[1:] == s[:-1]).all(axis=1))
    if dup.size:
        i = int(dup[0])
        raise _overlap_error(what, offs, int(order[i]), int(order[i + 1]))


def _paint(what: str, lo: np.ndarray, hi: np.ndarray, ncells: list[int], offs: np.ndarray) -> None:
    grid = np.zeros(ncells, dtype=bool)
    for i, (a, b) in enumerate(zip(lo.tolist(), hi.tolist())):
        region = grid[tuple(map(slice, a, b))]
        if region.any():
            # the first box painted before that shares a cell with this one
            j = int(np.flatnonzero(((lo[:i] < hi[i]) & (lo[i] < hi[:i])).all(axis=1))[0])
            raise _overlap_error(what, offs, j, i)
        region[...] = True


def _sweep(what: str, offs: np.ndarray, ends: np.ndarray) -> None:
    m, nd = offs.shape
    # the dimension where boxes open at each box's start are fewest (sum over boxes)
    best = None
    for k in range(nd):
        order = np.argsort(offs[:, k], kind="stable")
        starts = offs[order, k]
        # boxes open when box i starts = boxes started before i (in order) minus those ended
        ended = np.searchsorted(np.sort(ends[:, k]), starts, side="right")
        cost = int((np.arange(m) - ended).sum())
        if best is None or cost < best[0]:
            best = (cost, k, order)
    cost, k, order = best
    if cost * nd > SWEEP_BUDGET:
        raise CorruptCheckpointError(f"{what}: layout too irregular to validate ({cost} box pairs to compare); "
                                     "refusing it")
    others = [j for j in range(nd) if j != k]
    o_rest, e_rest = offs[:, others], ends[:, others]
    heap: list[tuple[int, int]] = []
    active: list[int] = []
    closed = 0
    done = np.zeros(m, dtype=bool)
    for i in order.tolist():
        start = int(offs[i, k])
        while heap and heap[0][0] <= start:
            done[heapq.heappop(heap)[1]] = True
            closed += 1
        if closed > len(active) // 2:
            active = [j for j in active if not done[j]]
            closed = 0
        if active:
            idx = np.array(active, dtype=np.int64)
            idx = idx[~done[idx]]
            hit = ((o_rest[idx] < e_rest[i]) & (o_rest[i] < e_rest[idx])).all(axis=1)
            if hit.any():
                raise _overlap_error(what, offs, int(idx[np.flatnonzero(hit)[0]]), i)
        active.append(i)
        heapq.heappush(heap, (int(ends[i, k]), i))
