"""The holders of the in-memory tier: one long-lived Ray actor per node and tier (#19).

A holder keeps the files of the memory tier's checkpoints (``store/memory.py``) that lie on
its node, as objects in Ray's object store that it owns: the writer puts a file's bytes
once, and each holder that keeps a copy (the writer's node and ``replicas`` peers) fetches
them and puts its own copy on its own node, so the bytes outlive the writer (the training
driver included) and losing any one node loses one copy only. (Ray 2.56 removed
``ray.put(_owner=)``, which would have saved the writer's node one copy.) Holders are detached named actors (``shardckpt-mem:<tier>:<node>`` in
the ``shardckpt`` namespace): a new driver, a restarted Ray Train worker group or the CLI
finds them by name; they go away when their node does, or when the tier is cleared.

A holder refuses a file that would take its node past ``capacity`` (a share of the node's
object store memory), so the tier never makes Ray spill to disk or an OOM kill: the save
aborts with the bytes needed and available named.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray
import xxhash
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

NAMESPACE = "shardckpt"
HOLDER_PREFIX = "shardckpt-mem"
#: Share of a node's Ray object store the tier may fill (the rest stays for Ray and training).
CAPACITY_FRACTION = 0.8
CALL_SECONDS = 120.0        # a holder that does not answer within this is taken as lost


def ensure_ray() -> None:
    """Connect to the Ray cluster of this job, or start a local one (the embedded default)."""
    if not ray.is_initialized():
        ray.init(logging_level="ERROR", log_to_driver=False, namespace=None, ignore_reinit_error=True)


class HolderFull(Exception):
    """A file does not fit in the holder's share of its node's object store."""


class Holder:
    """Actor body: the tier's files on one node, by root-relative key.

    Each entry is (refs, size, mtime, xxh3, data): ``refs`` a one-element list holding the
    ObjectRef of the file's pieces (a list of byte buffers, in order), or for a small file
    ``data``, its bytes, kept in this actor and handed out in the same reply. Aliases (an
    incremental save carrying a file, a re-save keeping one) share the object, so they cost
    nothing; bytes are counted once per distinct object."""

    def __init__(self, tier: str, node_id: str, capacity: int):
        self.tier, self.node_id, self.capacity = tier, node_id, int(capacity)
        self.entries: dict[str, tuple[list | None, int, float, str, bytes | None]] = {}
        self.reserved = 0            # bytes of puts under way
        self.lock = threading.Lock()
        # the first persist unpickles a store of the package here: import it now, off its path
        threading.Thread(target=_warm_imports, daemon=True, name="holder-imports").start()

    # --- what it holds -----------------------------------------------------------------------
    def _held(self) -> int:
        seen, total = set(), 0
        for refs, size, _, _, data in self.entries.values():
            ident = refs[0].hex() if refs else id(data)
            if ident not in seen:
                seen.add(ident)
                total += size
        return total

    def usage(self) -> dict:
        with self.lock:
            return {"node": self.node_id, "held_bytes": self._held(), "capacity": self.capacity,
                    "files": len(self.entries)}

    def listing(self, prefix: str) -> list[tuple[str, int, float, str]]:
        """(key, size, mtime, xxh3) of every file whose key starts with ``prefix``."""
        with self.lock:
            return [(k, e[1], e[2], e[3]) for k, e in self.entries.items() if k.startswith(prefix)]

    def entries_under(self, prefix: str) -> dict[str, tuple]:
        """Every entry whose key starts with ``prefix`` (one committed version's files: what a
        restore opens, in one call)."""
        with self.lock:
            return {k: e for k, e in self.entries.items() if k.startswith(prefix)}

    def get(self, key: str) -> tuple[list | None, int, float, str, bytes | None] | None:
        with self.lock:
            return self.entries.get(key)

    # --- taking files in ---------------------------------------------------------------------
    def put(self, key: str, refs: list, size: int, xxh3: str) -> None:
        """Keep file ``key``: ``refs[0]`` (the writer's object, which dies with the writer) is
        fetched to this node and put again, owned by this holder and stored on its node."""
        with self.lock:                  # reserved first: puts running at once cannot overfill
            free = self.capacity - self._held() - self.reserved
            old = self.entries.get(key)
            if size > free + (old[1] if old else 0):
                raise HolderFull(f"node {self.node_id[:12]}: {size} bytes do not fit ({max(free, 0)} of "
                                 f"{self.capacity} free for the memory tier {self.tier!r})")
            self.reserved += size
        try:
            pieces = ray.get(refs[0], timeout=CALL_SECONDS)
            refs = [ray.put(pieces)]
            del pieces
            with self.lock:
                self.entries[key] = (refs, size, time.time(), xxh3, None)
        finally:
            with self.lock:
                self.reserved -= size

    def put_small(self, key: str, data: bytes, xxh3: str) -> None:
        """A small file (a manifest, a config), kept in this actor's own memory."""
        with self.lock:
            self.entries[key] = (None, len(data), time.time(), xxh3, bytes(data))

    def alias(self, src: str, dst: str) -> bool:
        """Make ``dst`` the same file as ``src`` (no bytes move); False if ``src`` is not here."""
        with self.lock:
            entry = self.entries.get(src)
            if entry is None:
                return False
            self.entries[dst] = (entry[0], entry[1], time.time(), entry[3], entry[4])
            return True

    def delete(self, keys: list[str]) -> int:
        with self.lock:
            return sum(self.entries.pop(k, None) is not None for k in keys)

    def clear(self, prefix: str) -> int:
        """Drop every file under ``prefix`` (a tier's ``gc --all``, a test's clean slate)."""
        with self.lock:
            doomed = [k for k in self.entries if k.startswith(prefix)]
            for k in doomed:
                del self.entries[k]
            return len(doomed)

    # --- handing files out -------------------------------------------------------------------
    def write_out(self, key: str, staging: Any, name: str) -> tuple[str, int, str]:
        """Stream file ``key`` into another store's ``staging`` as ``name``, from here (the
        persistent tier's copy: the training process sends nothing). Returns (stored
        name, size, xxh3) of what was written; refuses bytes that do not match the
        checksum recorded when they were taken in."""
        entry = self.get(key)
        if entry is None:
            raise FileNotFoundError(key)
        pieces = ray.get(entry[0][0], timeout=CALL_SECONDS) if entry[0] else [entry[4]]
        check = xxhash.xxh3_64()
        for p in pieces:
            check.update(p)
        if check.hexdigest() != entry[3]:
            raise ValueError(f"{key}: the copy held on node {self.node_id[:12]} does not match its checksum")

        def fill(sink) -> None:
            for p in pieces:
                sink.write(p)
        _, written = staging.write_stream(name, fill)
        return written.name, written.size, written.xxh3_64


def _warm_imports() -> None:
    import importlib
    for module in ("shardckpt.store.local", "shardckpt.store.s3", "shardckpt.store.arrow"):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - an optional store's extra is missing: imported when used
            pass


def holder_name(tier: str, node_id: str) -> str:
    return f"{HOLDER_PREFIX}:{tier}:{node_id}"


def alive_nodes() -> dict[str, int]:
    """Alive nodes that can host actors -> their object store capacity in bytes."""
    return {n["NodeID"]: int(n["Resources"].get("object_store_memory", 0))
            for n in ray.nodes() if n.get("Alive") and n.get("Resources")}


def holder_on(tier: str, node_id: str, capacity: int, create: bool = True) -> Any | None:
    """The holder of ``tier`` on node ``node_id`` (created there when missing and ``create``)."""
    name = holder_name(tier, node_id)
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        if not create:
            return None
    actor = ray.remote(Holder).options(
        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_restarts=0, max_concurrency=16,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    return actor.remote(tier, node_id, int(capacity * CAPACITY_FRACTION))
