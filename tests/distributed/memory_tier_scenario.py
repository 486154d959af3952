"""Run in a subprocess by test_memory_tier.py: the memory tier on a 4-node
ray.cluster_utils.Cluster, with node losses, damaged replicas, a full tier and a SIGKILLed
driver. Prints one JSON line of findings (the test asserts on them).

Phases (each on the cluster as the previous left it):
1. a manager saves steps 1-4 to memory (replicas=1, keep=2, Ray writers on every node),
   persisting every 3rd step to a local directory; the held bytes per node are recorded;
2. one worker node is removed; a fresh manager on a replacement node loads the newest step:
   bit-exact, and nothing read from the directory;
3. a flipped byte in one copy of a shard: skipped; in both copies: our error naming it;
4. steps 6 (persisted) and 7 (not) are saved, then two nodes adjacent in the placement
   ring are removed: step 7 cannot be completed and is passed over (said), step 6 comes
   from memory, its lost files from the directory;
5. a save larger than the tier's free memory fails before writing anything;
6. a driver process is SIGKILLed while it saves step 3 to a tier of its own; a new driver
   resumes from step 2 in memory, bit-exact, and the partial step is invisible.
"""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import ray
from ray.cluster_utils import Cluster

from shardckpt.store.memory import SMALL_FILE, RayMemoryStore

ARRAYS, ROWS, COLS = 8, 256, 512          # 4 MiB of float32 per step (CI-sized)
NODE_STORE = 150 * 2**20                  # object store memory of each simulated node
HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
          "health_check_initial_delay_ms": 0}


def state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {f"w{i}": rng.standard_normal((ROWS, COLS)).astype(np.float32) for i in range(ARRAYS)}


def same(tree, step: int) -> bool:
    want = state(step)
    return all(np.array_equal(np.asarray(tree[k]), want[k]) for k in want)


def manager(directory: str, tier: str, **kw):
    from shardckpt import CheckpointManager, MemoryTier
    return CheckpointManager(directory, max_to_keep=3, memory=MemoryTier(replicas=1, keep=2, name=tier),
                             persist_every=3, num_shards=8, **kw)


@ray.remote(num_cpus=0)
def load_on_this_node(directory: str, tier: str) -> dict:
    """A participant on a replacement node: a fresh manager, the newest step."""
    from shardckpt.store.base import read_stats
    before = read_stats()["bytes"]
    mgr = manager(directory, tier, backend="threads")
    st = mgr.load_latest(model={f"w{i}": np.zeros((ROWS, COLS), np.float32) for i in range(ARRAYS)})
    r = mgr.last_restore
    return {"step": st.step, "exact": same(st.model, st.step), "tier": r.tier, "from_memory": r.bytes_from_memory,
            "from_persistent": r.bytes_from_persistent, "storage_read": read_stats()["bytes"] - before,
            "node": ray.get_runtime_context().get_node_id()}


def ring_of(store) -> list[str]:
    return sorted(store.holders())


def placement(store, name: str) -> dict[str, list[str]]:
    """Shard file -> the nodes holding it."""
    out: dict[str, list[str]] = {}
    base = store.key(name) + "/"
    for node, rows in store.ask("listing", base).items():
        for key, size, _, _ in rows:
            if size > SMALL_FILE:
                out.setdefault(key[len(base):], []).append(node)
    return out


def flip(store, name: str, node: str) -> None:
    """Replace the copy of ``name`` held on ``node`` by one with a byte flipped."""
    key = store.key(name)

    def damage(holder, key):
        refs, size, mtime, xxh3, data = holder.entries[key]
        pieces = [np.array(p, copy=True) if not isinstance(p, bytes) else bytearray(p) for p in ray.get(refs[0])]
        big = max(range(len(pieces)), key=lambda i: len(pieces[i]))
        pieces[big][len(pieces[big]) // 2] ^= 0x40
        holder.entries[key] = ([ray.put([bytes(p) if isinstance(p, bytearray) else p for p in pieces])], size,
                               mtime, xxh3, data)
    ray.get(store.holders()[node].__ray_call__.remote(damage, key))


def node_handle(cluster, node_id):
    return next(n for n in cluster.worker_nodes if n.node_id == node_id)


def driver_kill_phase(address: str, workdir: str) -> dict:
    """Phase 6: a driver of its own, SIGKILLed mid-save; a new driver resumes."""
    code = f"""
import sys, time, numpy as np, ray
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
ray.init(address={address!r}, logging_level="ERROR", log_to_driver=False)
import memory_tier_scenario as s
from shardckpt import CheckpointManager, MemoryTier
mgr = CheckpointManager({os.path.join(workdir, 'killed')!r}, memory=MemoryTier(replicas=1, keep=3, name="killed"),
                        persist_every=100, backend="threads", num_shards=4)
for step in (1, 2):
    mgr.save(step, s.state(step))
    print("committed", step, flush=True)
from shardckpt.store import memory
import threading
real, say = memory.RayMemoryStore.hold, threading.Lock()
def slow_hold(self, name, sink):          # widen the window: the kill lands inside step 3's writes
    real(self, name, sink)
    with say:                             # writer threads hold files at once: one whole line each
        sys.stdout.write(f"held {{name}}\\n")
        sys.stdout.flush()
    time.sleep(30)
memory.RayMemoryStore.hold = slow_hold
mgr.save(3, s.state(3))
print("committed", 3, flush=True)
"""
    errors = open(os.path.join(workdir, "killed-driver.err"), "w+")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=errors, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    seen = []
    deadline = time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line.strip())
        if line.startswith("held"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    errors.seek(0)
    stderr_tail = [line.rstrip() for line in errors.readlines() if "Traceback" in line or "Error" in line][-6:]
    from shardckpt import CheckpointManager, MemoryTier
    mgr = CheckpointManager(os.path.join(workdir, "killed"), memory=MemoryTier(replicas=1, keep=3, name="killed"),
                            backend="threads")
    steps = mgr.all_steps()
    st = mgr.load_latest(model={f"w{i}": np.zeros((ROWS, COLS), np.float32) for i in range(ARRAYS)})
    out = {"seen": seen, "steps_after_kill": steps, "resumed_step": st.step, "resumed_exact": same(st.model, st.step),
           "resumed_tier": mgr.last_restore.tier, "killed_rc": proc.returncode, "driver_errors": stderr_tail}
    mgr.tiers.store.clear()
    return out


def main(workdir: str) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": NODE_STORE, "_system_config": HEALTH})
    for _ in range(3):
        cluster.add_node(num_cpus=1, object_store_memory=NODE_STORE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    from shardckpt import CorruptCheckpointError
    from shardckpt.errors import CheckpointError
    from shardckpt.store.base import read_stats

    out: dict = {}
    directory = os.path.join(workdir, "run")
    # --- 1: saves to memory, persisted every 3rd -------------------------------------------
    mgr = manager(directory, "scn", backend="ray")
    save_s = []
    for step in (1, 2, 3, 4):
        t0 = time.time()
        mgr.save(step, state(step))
        save_s.append(time.time() - t0)
    mgr.wait_until_persisted()
    store = mgr.tiers.store
    out["save_s"] = save_s
    out["memory_steps"] = [i.step for i in mgr.tiers.catalog.checkpoints()]
    out["persistent_steps"] = [i.step for i in mgr.catalog.checkpoints()]
    out["all_steps"] = mgr.all_steps()
    out["usage"] = {n[:8]: u["held_bytes"] for n, u in store.usage().items()}
    out["state_bytes"] = ARRAYS * ROWS * COLS * 4
    out["nodes"] = len(ring_of(store))
    where4 = placement(store, "step_4")
    out["copies_per_shard"] = sorted({len(v) for v in where4.values()})
    out["shards_step4"] = len(where4)

    # --- 2: one node lost; restore on a replacement node ------------------------------------
    head = cluster.head_node.node_id
    ring = ring_of(store)
    writers = {n for nodes in where4.values() for n in nodes}
    victim = next(n for n in ring if n != head and n in writers)
    t0 = time.time()
    cluster.remove_node(node_handle(cluster, victim), allow_graceful=False)
    replacement = cluster.add_node(num_cpus=1, object_store_memory=NODE_STORE)
    cluster.wait_for_nodes()
    while any(n["NodeID"] == victim and n["Alive"] for n in ray.nodes()):
        time.sleep(0.2)
    out["node_loss_detected_s"] = time.time() - t0
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    t0 = time.time()
    got = ray.get(load_on_this_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        replacement.node_id, soft=False)).remote(directory, "scn"))
    got["wall_s"] = time.time() - t0
    got["on_replacement"] = got.pop("node") == replacement.node_id
    out["after_one_loss"] = got
    # the same from this driver, counting its own storage reads
    before = read_stats()["bytes"]
    fresh = manager(directory, "scn", backend="threads")
    st = fresh.load_latest(model={f"w{i}": np.zeros((ROWS, COLS), np.float32) for i in range(ARRAYS)})
    out["driver_after_one_loss"] = {"step": st.step, "exact": same(st.model, st.step),
                                    "storage_read": read_stats()["bytes"] - before, "tier": fresh.last_restore.tier}

    # --- 3: damaged copies ----------------------------------------------------------------------
    where4 = placement(store, "step_4")
    shard, holders_of = next((f, n) for f, n in sorted(where4.items()) if len(n) == 2)
    flip(store, f"step_4/{shard}", holders_of[0])
    reader = manager(directory, "scn", backend="threads")      # a fresh store: no lookups of before the damage
    st = reader.load_step(4, model={f"w{i}": np.zeros((ROWS, COLS), np.float32) for i in range(ARRAYS)})
    out["one_copy_damaged"] = {"exact": same(st.model, 4)}
    flip(store, f"step_4/{shard}", holders_of[1])
    try:
        reader = manager(directory, "scn", backend="threads")
        reader.load_step(4, model={f"w{i}": np.zeros((ROWS, COLS), np.float32) for i in range(ARRAYS)})
        out["both_copies_damaged"] = {"raised": None}
    except CorruptCheckpointError as e:
        out["both_copies_damaged"] = {"raised": "CorruptCheckpointError", "names_shard": shard in str(e),
                                      "message": str(e)[:300]}

    # --- 4: two adjacent nodes lost -----------------------------------------------------------
    writing = manager(directory, "scn", backend="ray")       # writers on every node: shards spread
    for step in (6, 7):
        writing.save(step, state(step))
    writing.wait_until_persisted()
    out["persistent_before_loss2"] = [i.step for i in writing.catalog.checkpoints()]
    where7 = placement(store, "step_7")
    ring = ring_of(store)
    pairs = [(ring[i], ring[(i + 1) % len(ring)]) for i in range(len(ring))]
    lost_files = {p: [f for f, nodes in where7.items() if set(nodes) <= set(p)] for p in pairs if head not in p}
    pair = max(lost_files, key=lambda p: len(lost_files[p]))
    out["loss2_files_without_copy"] = len(lost_files[pair])
    for node in pair:
        cluster.remove_node(node_handle(cluster, node), allow_graceful=False)
    while any(n["NodeID"] in pair and n["Alive"] for n in ray.nodes()):
        time.sleep(0.2)
    before = read_stats()["bytes"]
    again = manager(directory, "scn", backend="threads")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st = again.load_latest(model={f"w{i}": np.zeros((ROWS, COLS), np.float32) for i in range(ARRAYS)})
    r = again.last_restore
    out["after_two_losses"] = {"step": st.step, "exact": same(st.model, st.step), "tier": r.tier,
                               "from_memory": r.bytes_from_memory, "from_persistent": r.bytes_from_persistent,
                               "storage_read": read_stats()["bytes"] - before, "reason": r.reason,
                               "warned": any("step 7" in str(w.message) for w in caught)}

    # --- 5: a save larger than the tier's free memory -----------------------------------------
    usage_before = {n: u["held_bytes"] for n, u in store.usage().items()}
    big = {f"b{i}": np.ones((1024, 1024 * 16), np.float32) for i in range(4)}    # 256 MiB x 2 copies
    try:
        again.save(9, big)
        out["too_big"] = {"raised": None}
    except CheckpointError as e:
        out["too_big"] = {"raised": type(e).__name__, "message": str(e)[:400],
                          "usage_unchanged": {n: u["held_bytes"] for n, u in store.usage().items()} == usage_before,
                          "listed": 9 in again.all_steps()}
    # one node's share full while the tier as a whole has room: the holder refuses, the save aborts
    from shardckpt.testing import save_items
    lone = RayMemoryStore("mem://scn-lone?replicas=0")
    lone_before = {n: u["held_bytes"] for n, u in lone.usage().items()}
    try:
        save_items(lone.location("ck"), {"s": {"x": np.ones(130 * 2**18, np.float32)}}, backend="threads",
                   num_shards=2)                                            # 130 MiB, all on this node
        out["node_full"] = {"raised": None}
    except CheckpointError as e:
        out["node_full"] = {"raised": type(e).__name__, "message": str(e)[:400],
                            "usage_unchanged": {n: u["held_bytes"] for n, u in lone.usage().items()} == lone_before,
                            "listed": bool(lone.list(""))}
    store.clear()

    # --- 6: the driver SIGKILLed mid-save -------------------------------------------------------
    out["driver_kill"] = driver_kill_phase(cluster.address, workdir)
    ray.shutdown()
    cluster.shutdown()
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])), flush=True)
