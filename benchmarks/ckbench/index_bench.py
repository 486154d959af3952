"""``--index-bench``: the committer's and the loader's cost for a synthetic index of
10^5..10^6 chunks (fake shard reports, no shard data: only metadata costs).

This is the one module that relies on shardckpt internals (they may move while shardckpt is
refactored): ``shardckpt.checkpoint.Checkpoint``, ``shardckpt.transaction.{PartReport, CommitArgs, commit}``,
``shardckpt.format.ItemRecord``, ``shardckpt.shard_io.{ChunkRecord, ShardReport}``,
``shardckpt.store.LocalStore``, ``shardckpt.tree.ArraySpec``, ``shardckpt.plan.box_overlap``.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from pathlib import Path

from .common import load_avg


def index_bench(args, console) -> dict:
    """Time what grows with the number of chunks: the committer (``transaction.commit``: gather
    the parts' chunk lists, write structure + index + manifest, validate the index the way a
    loader will) and the loader (``Checkpoint(...).index()``), plus pickling the parts (what
    goes to the Ray coordinator). Fake shard reports, no shard data: only metadata costs."""
    import cProfile
    import io
    import pickle
    import pstats

    from shardckpt.format.manifest import ItemRecord
    from shardckpt.format.parts import CommitArgs, PartReport
    from shardckpt.format.shard import ChunkRecord, ShardReport
    from shardckpt.loading.checkpoint import Checkpoint
    from shardckpt.saving.commit import commit
    from shardckpt.store.local import LocalStore
    from shardckpt.tree import ArraySpec

    results = []
    for spec_s in args.index_bench:
        total, per_array = (int(float(x)) for x in spec_s.split("x")) if "x" in spec_s else (int(float(spec_s)), 512)
        arrays = max(1, total // per_array)
        participants, files_per = 64, 8
        nfiles = participants * files_per
        rows, cols = per_array * 8, 1024
        chunk_bytes = 8 * cols * 4
        specs = {f"layers.{a // 9}.w{a % 9}": ArraySpec("float32", (rows, cols), "float32", (rows, cols))
                 for a in range(arrays)}
        keys = list(specs)
        rec = ItemRecord(specs, {})
        reports: list[list[ShardReport]] = [[] for _ in range(participants)]
        file_chunks: list[list[ChunkRecord]] = [[] for _ in range(nfiles)]
        file_pos = [0] * nfiles
        c = 0
        for a, key in enumerate(keys):
            for j in range(per_array):
                f = (a * per_array + j) % nfiles
                member = f"{key}@{j * 8}_0"
                file_chunks[f].append(ChunkRecord(key, member, (j * 8, 0), (8, cols), file_pos[f] + 128,
                                                  chunk_bytes, (c * 2654435761) & 0xFFFFFFFF))
                file_pos[f] += chunk_bytes + 128
                c += 1
        parts = []
        for p in range(participants):
            reps, item_of = [], {}
            for k in range(files_per):
                f = p * files_per + k
                name = f"state-p{p:05d}-{k:05d}-of-{files_per:05d}.npz"
                reps.append(ShardReport(name, file_pos[f] + 4096, "0123456789abcdef", file_chunks[f],
                                        {"host": f"h{p}", "pid": 1, "node_id": f"node{p:03d}", "writer": f"w{p}"}))
                item_of[name] = "state"
            parts.append(PartReport(p, {"state": rec}, reps, item_of))
        work = Path(tempfile.mkdtemp(prefix="indexbench-", dir=args.workdir))
        try:
            t0 = time.perf_counter()
            blob = pickle.dumps(parts, protocol=5)
            t_pickle = time.perf_counter() - t0
            final = work / "step_1"
            staging = LocalStore(work).stage("step_1", "0123456789abcdef0123")
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            commit(staging, parts, CommitArgs(step=1, json_files={"config.json": {}}, metrics={}))
            prof.disable()
            t_commit = time.perf_counter() - t0
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(8)
            t0 = time.perf_counter()
            ck = Checkpoint(final)
            t_manifest = time.perf_counter() - t0
            t0 = time.perf_counter()
            index = ck.index()
            t_index = time.perf_counter() - t0
            # One host's restore planning (Checkpoint._read_boxes): each of its 8 devices wants
            # one box of every array; every chunk of the array is tested against every box.
            from shardckpt.loading.geometry import box_overlap
            rows_per_host = rows // participants if rows >= participants else rows
            t0 = time.perf_counter()
            hits = 0
            for key, entries in index["state"].items():
                boxes = [((d * rows_per_host // 8, 0), (max(1, rows_per_host // 8), cols)) for d in range(8)]
                for bo, bs in boxes:
                    for _f, ch in entries:
                        if box_overlap(ch.offset, ch.shape, bo, bs) is not None:
                            hits += 1
            t_plan = time.perf_counter() - t0
            d = {"chunks": c, "arrays": arrays, "chunks_per_array": per_array, "files": nfiles,
                 "participants": participants, "pickle_parts_s": t_pickle, "pickled_mb": len(blob) / 1e6,
                 "commit_s": t_commit, "open_manifest_s": t_manifest, "load_index_s": t_index,
                 "restore_plan_one_host_s": t_plan, "restore_plan_box_tests": len(index["state"]) * 8 * per_array,
                 "index_mb": (final / "index.msgpack").stat().st_size / 1e6,
                 "manifest_mb": (final / "manifest.json").stat().st_size / 1e6,
                 "commit_profile": s.getvalue()[-6000:], "load_avg": load_avg()}
            results.append(d)
            console.print(f"  {c:,} chunks ({arrays} arrays x {per_array}): pickle parts {t_pickle:.2f} s "
                          f"({d['pickled_mb']:.0f} MB), commit {t_commit:.2f} s, open manifest {t_manifest:.3f} s, "
                          f"load+validate index {t_index:.2f} s, one host's restore planning {t_plan:.2f} s, "
                          f"index {d['index_mb']:.1f} MB")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        del parts, reports, file_chunks
        gc.collect()
    return {"runs": results}

