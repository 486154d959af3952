"""The in-memory tier: a Store whose files live in Ray's object store, replicated across nodes (#19).

``mem://TIER/prefix?replicas=1`` names it. Checkpoints are laid out as on an object store
(``versioned.py``: files under a version prefix, the manifest switched last), so the same
coordinators, executors, committer, catalog, ``verify`` and manager work with it unchanged.
The files themselves are held by one holder actor per node (``holder.py``):

* a shard file written on node X is kept by X's holder and by the holders of the next
  ``replicas`` nodes (in the ring of alive nodes, sorted by id), so losing any ``replicas``
  nodes leaves a copy; small files (manifest, index, config) are kept by every holder;
* a commit happens only once every copy is held (``write_stream`` returns after all of
  them), and the manifest goes to every holder last; a reader takes the newest manifest any
  holder has, so a driver that dies while switching it leaves one whole version or the other;
* a read takes each file from the nearest holder whose copy matches the checksum recorded
  when it was written (a damaged copy is skipped); with none left, from ``fallback`` (the
  persistent tier, where the same step was persisted: same file name, size and xxh3), else
  ``CorruptCheckpointError`` naming the file and the nodes that held it;
* carrying a file into another checkpoint (an incremental save) aliases the holders' objects.

What this process read from the tier is counted in ``MEMORY_READ_STATS`` (reads from the
fallback count as storage reads, ``store.base.READ_STATS``), which is how a restore reports
how much came from memory.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import numpy as np
import ray
import xxhash
from ray.exceptions import GetTimeoutError, RayActorError

from shardckpt.errors import CheckpointError, CorruptCheckpointError, SaveAbortedError
from shardckpt.format.limits import MAX_MANIFEST_BYTES
from shardckpt.format.manifest import MANIFEST, Manifest
from shardckpt.format.names import is_version_dir
from shardckpt.store.base import Entry, Sink, Source, Store, T, VersionChanged, Written
from shardckpt.store.holder import CALL_SECONDS, HolderFull, alive_nodes, ensure_ray, holder_on
from shardckpt.store.versioned import VersionedStaging, VersionedStore

MAX_FILE_BYTES = 128 << 20    # the largest shard file a save plans for the tier
SMALL_FILE = 64 << 10         # files up to this size (manifest, config, small index) are kept by every holder
NODES_TTL = 2.0               # seconds a view of the alive nodes is reused
MEMORY_READ_STATS = {"bytes": 0, "reads": 0}
_STATS_LOCK = threading.Lock()
# This process's view of the cluster: alive nodes (with when they were listed) and, per tier,
# the holders' handles. Shared by every store instance (each save resolves its URI anew).
_VIEW: dict[str, Any] = {"nodes": (0.0, {}), "handles": {}}
_VIEW_LOCK = threading.Lock()

try:                          # Ray >= 2.10 names an actor that cannot be reached (yet) apart
    from ray.exceptions import ActorUnavailableError
    LOST = (RayActorError, ActorUnavailableError, GetTimeoutError)
except ImportError:           # pragma: no cover - older Ray
    LOST = (RayActorError, GetTimeoutError)


def memory_read_stats() -> dict:
    with _STATS_LOCK:
        return dict(MEMORY_READ_STATS)


def _count(nbytes: int) -> None:
    with _STATS_LOCK:
        MEMORY_READ_STATS["bytes"] += nbytes
        MEMORY_READ_STATS["reads"] += 1


class PiecesSink(Sink):
    """Keeps what a writer writes as pieces, hashing in order. Large pieces are kept as
    they are (views of the writer's snapshot, valid until ``write_stream`` returns: nothing
    in this package reuses a buffer within one file) and copied once, into the object store."""

    def __init__(self):
        self.pieces: list = []
        self.pos = 0
        self.hasher = xxhash.xxh3_64()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.pieces.append(np.frombuffer(view, np.uint8) if len(view) >= 65536 else bytes(view))
        self.pos += len(view)

    def joined(self) -> bytes:
        return b"".join(bytes(p) for p in self.pieces)


class PiecesSource(Source):
    """A held file (its pieces, mapped from the object store) opened for ranged reads."""

    def __init__(self, pieces: list, name: str):
        self.pieces = [memoryview(p).cast("B") for p in pieces]
        self.ends = np.cumsum([len(p) for p in self.pieces]).tolist()
        self.size = self.ends[-1] if self.ends else 0
        self.name = name.rsplit("/", 1)[-1]

    def readinto(self, offset: int, view: memoryview) -> None:
        n = len(view)
        if offset < 0 or offset + n > self.size:
            raise CorruptCheckpointError(f"{self.name}: bytes {offset}..{offset + n} lie outside the file "
                                         f"({self.size} bytes)")
        i = int(np.searchsorted(self.ends, offset, side="right"))
        done = 0
        while done < n:
            start = self.ends[i] - len(self.pieces[i])
            lo = offset + done - start
            take = min(n - done, len(self.pieces[i]) - lo)
            view[done:done + take] = self.pieces[i][lo:lo + take]
            done += take
            i += 1
        _count(n)


@dataclass
class Sources:
    """Where a restore of one checkpoint will take its files from: held copies in memory,
    per file from the fallback (persisted), or nowhere (lost)."""

    memory: list[str] = field(default_factory=list)
    fallback: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    memory_bytes: int = 0
    fallback_bytes: int = 0


def _identity(stored: str, rec) -> tuple[str, int, str]:
    """What makes a file of a persisted copy the same file: base name, size, xxh3."""
    return stored.rsplit("/", 1)[-1], rec.size, rec.xxh3_64


def _pieces_of(entry: tuple) -> list:
    """The pieces of a held file: its bytes as handed back (small), or its object's."""
    refs, data = entry[0], entry[4]
    return [data] if refs is None else ray.get(refs[0], timeout=CALL_SECONDS)


def _intact(pieces: list, xxh3: str) -> bool:
    h = xxhash.xxh3_64()
    for p in pieces:
        h.update(p)
    return h.hexdigest() == xxh3


class RayMemoryStore(VersionedStore):
    """Checkpoints held in the memory of the Ray cluster's nodes (see module doc)."""

    #: Files of at most this size: a file is in the object store twice while it is taken in
    #: (the writer's object and the holder's copy), so small files keep that transient small
    #: and spread a step's copies over the nodes.
    max_file_bytes = MAX_FILE_BYTES

    def __init__(self, uri: str, fallback: Store | None = None):
        parts = urlsplit(uri)
        if parts.scheme != "mem" or not parts.netloc:
            raise CheckpointError(f"{uri}: a memory tier is named mem://NAME[/prefix][?replicas=N]")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = sorted(set(query) - {"replicas"})
        if unknown:
            raise CheckpointError(f"{uri}: unknown option {unknown[0]!r} (a memory tier takes replicas=N)")
        try:
            self.replicas = int(query.get("replicas", 1))
        except ValueError:
            raise CheckpointError(f"{uri}: replicas={query['replicas']!r} is not a number") from None
        if not 0 <= self.replicas <= 8:
            raise CheckpointError(f"{uri}: replicas={self.replicas}: expected 0 to 8 copies beside the first")
        self.tier, self.prefix = parts.netloc, parts.path.strip("/")
        self.uri = f"mem://{self.tier}/{self.prefix}".rstrip("/")
        self._query = f"?replicas={self.replicas}"
        self.fallback = fallback
        self.deadline = None
        self._versions: dict[str, tuple[float, dict]] = {}     # version prefix -> (when, node -> entries)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_versions": {}}

    @classmethod
    def claims(cls, uri: str) -> bool:
        return uri.startswith("mem://")

    def where(self, name: str = "") -> str:
        return (f"{self.uri}/{name}" if name else self.uri) + self._query

    def key(self, name: str) -> str:
        return "/".join(p for p in (self.prefix, name) if p)

    # --- the holders -------------------------------------------------------------------------
    def nodes(self) -> dict[str, int]:
        """Alive nodes -> object store capacity (one view per process, renewed every
        ``NODES_TTL`` seconds and whenever a holder is found lost)."""
        with _VIEW_LOCK:
            at, nodes = _VIEW["nodes"]
            if time.monotonic() - at <= NODES_TTL and nodes:
                return nodes
        ensure_ray()
        nodes = alive_nodes()
        with _VIEW_LOCK:
            _VIEW["nodes"] = (time.monotonic(), nodes)
        return nodes

    def holders(self, create: bool = True) -> dict[str, Any]:
        """node id -> holder handle, for every alive node (holders made where missing);
        handles are kept per process and tier, so a save or load finds them at once."""
        nodes = self.nodes()
        with _VIEW_LOCK:
            known = _VIEW["handles"].setdefault(self.tier, {})
            for gone in set(known) - set(nodes):
                del known[gone]
            have = dict(known)
        out = {}
        for node, capacity in sorted(nodes.items()):
            handle = have.get(node) or holder_on(self.tier, node, capacity, create)
            if handle is not None:
                out[node] = handle
        with _VIEW_LOCK:
            _VIEW["handles"][self.tier].update(out)
        return out

    def ask(self, method: str, *args, holders: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call ``method`` on every holder at once: node -> result (lost holders left out)."""
        holders = self.holders() if holders is None else holders
        refs = {node: getattr(h, method).remote(*args) for node, h in holders.items()}
        out = {}
        for node, ref in refs.items():
            try:
                out[node] = ray.get(ref, timeout=CALL_SECONDS)
            except LOST:
                self._forget(node)
        return out

    def _forget(self, node: str) -> None:
        with _VIEW_LOCK:
            _VIEW["handles"].get(self.tier, {}).pop(node, None)
            _VIEW["nodes"] = (0.0, {})

    def usage(self) -> dict[str, dict]:
        """Per node: bytes the tier holds there, its capacity, the number of files."""
        return self.ask("usage")

    # --- reading -----------------------------------------------------------------------------
    def _copies(self, name: str, version_files: bool = False) -> list[tuple[str, tuple]]:
        """(node, entry) of every holder that has file ``name``, this node's first. With
        ``version_files`` (a restore opening a committed version's shard): the holders are
        asked once for all the files of that version, reused for ``NODES_TTL`` seconds
        (a committed version's files never change; an entry's object stays alive while
        its reference is held, as an open file does)."""
        key = self.key(name)
        parent = key.rpartition("/")[0]
        if version_files and is_version_dir(parent.rsplit("/", 1)[-1]):
            at, table = self._versions.get(parent, (0.0, None))
            if table is None or time.monotonic() - at > NODES_TTL or not any(key in t for t in table.values()):
                table = self.ask("entries_under", parent + "/")
                self._versions = {parent: (time.monotonic(), table)}      # the version being read
            found = [(node, t[key]) for node, t in table.items() if key in t]
        else:
            found = [(node, e) for node, e in self.ask("get", key).items() if e is not None]
        here = ray.get_runtime_context().get_node_id()
        return sorted(found, key=lambda ne: (ne[0] != here, ne[0]))

    def _pieces(self, name: str) -> tuple[list | None, list[str]]:
        """The pieces of the first intact copy of ``name`` (None if none), and the nodes
        whose copies were damaged or unreachable."""
        bad = []
        for node, entry in self._copies(name, version_files=True):
            try:
                pieces = _pieces_of(entry)
            except Exception:  # noqa: BLE001 - a lost object or node: try the next copy
                bad.append(node)
                continue
            if _intact(pieces, entry[3]):
                return pieces, bad
            bad.append(node)
        return None, bad

    def read_bytes(self, name: str, limit: int) -> bytes:
        copies = self._copies(name)
        if not copies:
            raise FileNotFoundError(self.where(name))
        for node, entry in sorted(copies, key=lambda ne: -ne[1][2]):   # the newest first
            if entry[1] > limit:
                raise CorruptCheckpointError(f"{self.where(name)} is {entry[1]} bytes, over the {limit} limit")
            try:
                pieces = _pieces_of(entry)
            except Exception:  # noqa: BLE001 - try the next copy
                continue
            if _intact(pieces, entry[3]):
                return b"".join(bytes(p) for p in pieces)
        raise CorruptCheckpointError(f"{self.where(name)}: every copy in the memory tier is damaged or lost")

    def open(self, name: str) -> Source:
        pieces, bad = self._pieces(name)
        if pieces is not None:
            return PiecesSource(pieces, name)
        other = self._fallback_name(name)
        if other is not None:
            return self.fallback.open(other)
        if not bad:
            raise FileNotFoundError(self.where(name))
        raise CorruptCheckpointError(f"{self.where(name)}: no intact copy is left in the memory tier (the copies on "
                                     f"nodes {', '.join(n[:12] for n in bad)} are damaged or lost) and the step "
                                     "was not persisted")

    def _fallback_name(self, name: str) -> str | None:
        """The same file of the same checkpoint in the persistent tier (its name there), if
        the step was persisted: same base name, size and xxh3 as the memory tier records."""
        checkpoint, _, stored = name.partition("/")
        if self.fallback is None or not stored:
            return None
        try:
            ours = Manifest.loads(self.read_bytes(f"{checkpoint}/{MANIFEST}", MAX_MANIFEST_BYTES), self.where(checkpoint))
        except (OSError, CheckpointError):
            return None
        want = ours.files.get(stored) or ours.meta_files.get(stored)
        other = self._fallback_files(checkpoint).get(_identity(stored, want)) if want else None
        return f"{checkpoint}/{other}" if other else None

    def _fallback_files(self, checkpoint: str) -> dict[tuple[str, int, str], str]:
        """The fallback's files of ``checkpoint`` by identity (base name, size, xxh3); {} when
        it has no such checkpoint (not persisted)."""
        if self.fallback is None:
            return {}
        try:
            other = Manifest.loads(self.fallback.read_bytes(f"{checkpoint}/{MANIFEST}", MAX_MANIFEST_BYTES),
                                   self.fallback.where(checkpoint))
        except (OSError, CheckpointError):
            return {}
        return {_identity(f, r): f for f, r in [*other.files.items(), *other.meta_files.items()]}

    def copy_out(self, name: str, staging: Any, dst_name: str) -> Written:
        """Have a holder of an intact copy write file ``name`` into ``staging`` (the next
        copy's holder if one refuses a damaged copy)."""
        failures = []
        holders = self.holders()
        for node, _ in self._copies(name):
            handle = holders.get(node)
            if handle is None:
                continue
            try:
                stored, size, xxh3 = ray.get(handle.write_out.remote(self.key(name), staging, dst_name),
                                             timeout=CALL_SECONDS * 10)
                return Written(stored, size, xxh3)
            except LOST as e:
                self._forget(node)
                failures.append(f"node {node[:12]}: {type(e).__name__}")
            except ValueError as e:
                failures.append(str(e).splitlines()[-1][:200])
        if not failures:
            raise FileNotFoundError(self.where(name))
        raise CorruptCheckpointError(f"{self.where(name)}: no holder could copy it out ({'; '.join(failures)})")

    def sources(self, name: str) -> Sources:
        """Which files of checkpoint ``name`` a restore can take from a held copy, which from
        the fallback (the same step persisted), and which from nowhere: from one listing
        of the holders and the two manifests (no file is read; damage found by the read
        itself makes it try the next copy)."""
        raw = self.read_bytes(f"{name}/{MANIFEST}", MAX_MANIFEST_BYTES)
        manifest = Manifest.loads(raw, self.where(name))
        base = self.key(name) + "/"
        held = {key for rows in self.ask("listing", base).values() for key, *_ in rows}
        theirs = self._fallback_files(name)
        out = Sources()
        for stored, rec in [*manifest.files.items(), *manifest.meta_files.items()]:
            if base + stored in held:
                out.memory.append(stored)
                out.memory_bytes += rec.size
            elif _identity(stored, rec) in theirs:
                out.fallback.append(stored)
                out.fallback_bytes += rec.size
            else:
                out.lost.append(stored)
        return out

    def size(self, name: str) -> int | None:
        copies = self._copies(name)
        if copies:
            return copies[0][1][1]
        other = self._fallback_name(name)
        return self.fallback.size(other) if other is not None else None

    def list(self, prefix: str = "") -> list[Entry]:
        base = self.key(prefix)
        base = base + "/" if base else ""
        dirs: dict[str, float] = {}
        files: dict[str, Entry] = {}
        for rows in self.ask("listing", base).values():
            for key, size, mtime, _ in rows:
                rest = key[len(base):]
                if "/" in rest:
                    d = rest.split("/", 1)[0]
                    dirs[d] = max(dirs.get(d, 0.0), mtime)
                elif rest not in files or files[rest].mtime < mtime:
                    files[rest] = Entry(rest, False, size, mtime)
        return [Entry(d, True, 0, t) for d, t in sorted(dirs.items())] + [files[n] for n in sorted(files)]

    # --- writing -----------------------------------------------------------------------------
    def put(self, name: str, data: bytes) -> None:
        self._hold_small(self.key(name), bytes(data), xxhash.xxh3_64_hexdigest(data))

    def _hold_small(self, key: str, data: bytes, xxh3: str) -> None:
        holders = self.holders()
        refs = {node: h.put_small.remote(key, data, xxh3) for node, h in holders.items()}
        self._await(refs, key)

    def hold(self, name: str, sink: PiecesSink) -> None:
        """Keep a written file on its ``1 + replicas`` nodes (all of them for a small one);
        returns once every copy is held."""
        key, xxh3 = self.key(name), sink.hasher.hexdigest()
        if sink.pos <= SMALL_FILE:
            self._hold_small(key, sink.joined(), xxh3)
            return
        holders = self.holders()
        ring = sorted(holders)
        need = 1 + self.replicas
        if len(ring) < need:
            raise CheckpointError(f"{self.where()}: replicas={self.replicas} keeps every file on {need} nodes and the "
                                  f"Ray cluster has {len(ring)} alive; add nodes or use replicas={len(ring) - 1}")
        here = ray.get_runtime_context().get_node_id()
        start = ring.index(here) if here in ring else 0
        chosen = [ring[(start + k) % len(ring)] for k in range(need)]
        # One object of this process's; each holder puts its own copy on its own node (it must
        # own it to outlive this process: Ray 2.56 removed ray.put(_owner=)), then ours is freed.
        ref = ray.put(sink.pieces)
        calls = {node: holders[node].put.remote(key, [ref], sink.pos, xxh3) for node in chosen}
        self._await(calls, key)

    def _await(self, calls: dict[str, Any], key: str) -> None:
        for node, call in calls.items():
            try:
                ray.get(call, timeout=CALL_SECONDS)
            except HolderFull as e:
                raise SaveAbortedError(f"{self.where(key)}: the memory tier is full: {_holder_message(e)}") from None
            except LOST as e:
                self._forget(node)
                raise SaveAbortedError(f"{self.where(key)}: the memory tier's holder on node {node[:12]} was lost "
                                       f"({type(e).__name__}); nothing was committed") from e

    def delete(self, names: list[str]) -> None:
        if names:
            self.ask("delete", [self.key(n) for n in names])

    def copy(self, src: str, dst: str) -> None:
        if not any(self.ask("alias", self.key(src), self.key(dst)).values()):
            raise FileNotFoundError(self.where(src))

    def clear(self) -> int:
        """Drop every file under this root from every holder (``gc --all`` of a tier)."""
        base = self.key("")
        return sum(self.ask("clear", base + "/" if base else "").values())

    def stage(self, final: str, txn: str, owner: tuple[str, int] | None = None) -> RayMemoryStaging:
        return RayMemoryStaging(self, final, txn)

    def check_room(self, nbytes: int) -> None:
        """Refuse, before anything is written, a save of ``nbytes`` whose copies cannot fit in
        what the holders have free."""
        usage = self.usage()
        free = sum(max(0, u["capacity"] - u["held_bytes"]) for u in usage.values())
        need = nbytes * min(1 + self.replicas, max(1, len(usage)))
        if need > free:
            raise CheckpointError(
                f"{self.where()}: this save needs {need / 2**20:.1f} MiB of memory ({nbytes / 2**20:.1f} MiB x "
                f"{1 + self.replicas} copies) and the memory tier has {free / 2**20:.1f} MiB free on "
                f"{len(usage)} nodes; keep fewer steps in memory, use fewer replicas, or give Ray's object store "
                "more memory (nothing was written)")


def _holder_message(e: BaseException) -> str:
    """What a holder's own exception said (Ray wraps it; ``cause`` is the original)."""
    cause = getattr(e, "cause", None)
    return str(cause if cause is not None else e).splitlines()[0][:300]


class RayMemoryStaging(VersionedStaging):
    """A version prefix in the holders; the manifest switched on every holder last."""

    store: RayMemoryStore

    def write_stream(self, name: str, fill: Callable[[Sink], T]) -> tuple[T, Written]:
        sink = PiecesSink()
        result = fill(sink)
        self.store.hold(self.staged_path(name), sink)
        return result, Written(self.stored_name(name), sink.pos, sink.hasher.hexdigest())

    def expect_bytes(self, nbytes: int) -> None:
        self.store.check_room(nbytes)

    def version_token(self) -> str:
        try:
            raw = self.store.read_bytes(f"{self.final}/{MANIFEST}", MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            return ""
        return xxhash.xxh3_64_hexdigest(raw)

    def switch_manifest(self, manifest: bytes, expect: Any) -> bytes | None:
        try:
            previous = self.store.read_bytes(f"{self.final}/{MANIFEST}", MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            previous = None
        except CheckpointError:
            previous = None      # a damaged manifest is replaced; its files are leftovers for gc
        if expect is not None and (xxhash.xxh3_64_hexdigest(previous) if previous else "") != expect:
            raise VersionChanged(f"{self.store.where(self.final)} was replaced meanwhile")
        self.store.put(f"{self.final}/{MANIFEST}", manifest)
        return previous
