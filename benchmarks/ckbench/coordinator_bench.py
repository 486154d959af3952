"""Commit cost at 10^4..10^6 chunks through the real coordinator and index code (#13.1).

Synthetic part reports from P participants (no shard data: only metadata costs) go through
the Ray coordinator's actor body (``SaveCoordinator``, run in this process on an asyncio
loop: ``begin`` for every participant, ``report`` for every part, the last one commits with
``transaction.commit``), then a reader opens the checkpoint, loads the index and plans a
restore of one participant's 8 devices (each device wants the rows of its own slice of every
array), with ``ChunkTable.overlapping`` as the reader does. Prints wall and CPU (process)
seconds; ``--json`` writes the figures.

    python -m benchmarks.ckbench.coordinator_bench 1e4 1e5 1e6 --participants 1024
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import shutil
import tempfile
import time
from pathlib import Path


def synthetic_parts(total: int, participants: int, arrays_per_participant_file: int = 8):
    """``total`` chunks: arrays of 1,024 rows x 256 split by rows over the participants
    (FSDP-like: participant p writes rows [p*r, (p+1)*r) of every array)."""
    from shardckpt.format.manifest import ItemRecord
    from shardckpt.format.parts import PartReport
    from shardckpt.format.shard import ChunkRecord, ShardReport
    from shardckpt.tree import ArraySpec

    arrays = max(1, total // participants)
    rows = participants * 8
    cols = 256
    specs = {f"layers.{a // 16}.w{a % 16}": ArraySpec("float32", (rows, cols), "float32", (rows, cols))
             for a in range(arrays)}
    rec = ItemRecord(specs, {})
    keys = list(specs)
    per_file = max(1, math.ceil(arrays / arrays_per_participant_file))
    chunk_bytes = 8 * cols * 4
    parts = []
    crc = 1
    for p in range(participants):
        reports, item_of = [], {}
        for f in range(0, arrays, per_file):
            name = f"v0123456789abcdef/state-p{p:05d}-{f // per_file:05d}.npz"
            chunks, pos = [], 0
            for key in keys[f:f + per_file]:
                chunks.append(ChunkRecord(key, f"{key}@{p * 8}_0", (p * 8, 0), (8, cols), pos + 128, chunk_bytes, crc))
                crc = (crc * 2654435761) & 0xFFFFFFFF
                pos += chunk_bytes + 128
            reports.append(ShardReport(name, pos + 4096, "0123456789abcdef", chunks,
                                       {"host": f"h{p}", "pid": 1, "node_id": f"node{p:04d}", "writer": f"w{p}"}))
            item_of[name] = "state"
        # each participant sends its own copy of the record, with the digest it computed
        part = PartReport(p, {"state": ItemRecord(dict(rec.arrays), dict(rec.scalars))}, reports, item_of)
        part.digest("state")
        parts.append(part)
    return parts, arrays, rows, cols


class _FlatStaging:
    """A LocalStore staging whose manifest names carry a version prefix like an object
    store's, without a network (the files are only metadata here)."""


def run(total: int, participants: int, workdir: Path) -> dict:
    from shardckpt import Checkpoint
    from shardckpt.coord.ray_actor import SaveCoordinator
    from shardckpt.format.parts import CommitArgs
    from shardckpt.store.local import LocalStore

    t0 = time.perf_counter()
    parts, arrays, rows, cols = synthetic_parts(total, participants)
    t_build = time.perf_counter() - t0
    for part in parts:                       # local stores name files plainly
        for r in part.reports:
            r.file = r.file.split("/", 1)[1]
        part.item_of_file = {k.split("/", 1)[1]: v for k, v in part.item_of_file.items()}
    chunks = sum(len(r.chunks) for p in parts for r in p.reports)
    store = LocalStore(workdir)

    async def commit_all() -> tuple[float, float]:
        coord = SaveCoordinator(store)
        infos = [await coord.begin("step_1", participants, p, 600.0) for p in range(participants)]
        tid = infos[0]["txn"]
        t0, c0 = time.perf_counter(), time.process_time()
        for p, part in enumerate(parts):
            await coord.report(tid, p, part, CommitArgs(step=1) if p == 0 else None)
        await coord.wait(tid)
        return time.perf_counter() - t0, time.process_time() - c0

    gc.collect()
    t_commit, c_commit = asyncio.run(commit_all())
    # One participant's restore: its 8 devices each want rows [p*8 + d, +1) of every array.
    # It reads the index directory and only the fragments holding those rows
    # (Checkpoint.chunk_tables, what Checkpoint._read_boxes_of_this_version calls), then plans.
    from shardckpt.loading.geometry import aligned_empty, chunk_target
    p = participants // 2
    requests = {key: [((p * 8 + d, 0), (1, cols)) for d in range(8)] for key in parts[0].items["state"].arrays}
    t0 = time.perf_counter()
    ck = Checkpoint(workdir / "step_1")
    t_open = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    tables = ck.chunk_tables("state", requests)
    t_index, c_index = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    hits = 0
    for key, boxes in requests.items():
        for box in boxes:
            dest = aligned_empty(box[1], "float32")
            for _f, c in tables[key].overlapping(*box):
                if chunk_target(c, dest, box) is not None:
                    hits += 1
    t_plan, c_plan = time.perf_counter() - t0, time.process_time() - c0
    index_read = ck.index_bytes_read
    # A reader of the whole index (verify, inspection, a carried-over item): every fragment.
    t0 = time.perf_counter()
    whole = Checkpoint(workdir / "step_1")
    whole.index()
    t_full = time.perf_counter() - t0
    index_files = [n for n in whole.manifest.meta_files if n.rsplit("/", 1)[-1].startswith("index")]
    size = {"manifest.json": (workdir / "step_1" / "manifest.json").stat().st_size,
            "index": sum((workdir / "step_1" / n).stat().st_size for n in index_files)}
    return {"chunks": chunks, "participants": participants, "arrays": arrays, "build_parts_s": t_build,
            "commit_s": t_commit, "open_manifest_s": t_open, "load_index_s": t_index,
            "plan_one_participant_s": t_plan, "plan_hits": hits, "index_files": len(index_files),
            "index_mb_read_by_one_participant": index_read / 1e6, "load_whole_index_s": t_full,
            "commit_cpu_s": c_commit, "load_index_cpu_s": c_index, "plan_cpu_s": c_plan,
            "manifest_mb": size["manifest.json"] / 1e6, "index_mb": size["index"] / 1e6}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("totals", nargs="+", type=float)
    ap.add_argument("--participants", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = []
    for total in args.totals:
        work = Path(tempfile.mkdtemp(prefix="coordbench-"))
        try:
            r = run(int(total), args.participants, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        out.append(r)
        print(f"{r['chunks']:>9,} chunks {r['participants']:>5} participants {r['arrays']:>5} arrays | commit "
              f"{r['commit_s']:6.2f} s | open manifest {r['open_manifest_s']:5.2f} s | load index "
              f"{r['load_index_s']:5.2f} s | plan 8 devices {r['plan_one_participant_s']:5.2f} s | index "
              f"{r['index_mb']:6.1f} MB in {r['index_files']} files, one participant reads "
              f"{r['index_mb_read_by_one_participant']:6.2f} MB | whole index {r['load_whole_index_s']:5.2f} s | "
              f"manifest {r['manifest_mb']:5.1f} MB | CPU: commit {r['commit_cpu_s']:.2f} s, "
              f"load index {r['load_index_cpu_s']:.2f} s, plan {r['plan_cpu_s']:.2f} s", flush=True)
        gc.collect()
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": out}, indent=1))


if __name__ == "__main__":
    main()
