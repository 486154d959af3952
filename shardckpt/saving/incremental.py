"""Incremental saves: write only what changed since a base checkpoint, carry the rest.

An array is unchanged when its spec (real dtype, shape, stored layout) equals the base's and
its content digest equals the one the base recorded (``ItemRecord.digests``: xxh3-64 over
the stored bytes of its pieces in box order, with the boxes: a digest never matches another
layout). A digest is computed here, once per save, far faster than the disk writes it saves;
a base without digests carries nothing (its successor records them).

Unchanged arrays are carried by carrying the base's shard files that hold them, whole: the
committer ``adopt``s each (a hard link on a local disk, a server-side copy on object stores),
so every committed step stays self-contained and deleting any step never breaks another. A
base file also holding arrays that changed is carried while at least ``MIN_LIVE`` of its
bytes are still referenced (the rest is dead weight it keeps); below that its unchanged
arrays are written afresh, into new files that hold only them. Written files get a name tag
of this save, so they never clash with the carried ones. If the base is replaced or deleted
while its files are carried, the committer refuses (``BaseChanged``) and the save is done
again without a base: never a file of another version under this manifest.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import xxhash

from shardckpt.errors import SaveAbortedError
from shardckpt.format.manifest import ItemRecord
from shardckpt.format.parts import Carry
from shardckpt.format.version import Version
from shardckpt.tree import ArrayEntry

MIN_LIVE = 0.5          # carry a base file while at least this share of its bytes is still referenced


class BaseChanged(SaveAbortedError):
    """The base checkpoint of an incremental save was replaced or deleted while its files were
    carried; nothing was committed (the caller saves again without a base)."""


class LeafDigests:
    """Digests of the ``jax.Array`` leaves this process saved, by identity. A jax.Array is
    immutable, so the same object saved again holds the same bytes: its digest is known at
    no cost (a frozen base is not hashed again by every save). Entries go with their arrays
    (weak references); a hit also needs the same spec."""

    def __init__(self):
        self._by_id: dict[int, tuple[weakref.ref, object, str]] = {}
        self._lock = threading.Lock()

    def get(self, leaf, spec) -> str | None:
        with self._lock:
            hit = self._by_id.get(id(leaf))
        return hit[2] if hit is not None and hit[0]() is leaf and hit[1] == spec else None

    def put(self, leaf, spec, digest: str) -> None:
        key = id(leaf)

        def forget(_ref, key=key):
            with self._lock:
                if self._by_id.get(key, (None,))[0] is _ref:
                    del self._by_id[key]
        try:
            ref = weakref.ref(leaf, forget)
        except TypeError:
            return
        with self._lock:
            self._by_id[key] = (ref, spec, digest)


LEAF_DIGESTS = LeafDigests()


def digest_of(entry: ArrayEntry) -> str:
    """``digest_pieces(entry)``, or the digest its ``jax.Array`` leaf had when this process
    saved that same object before."""
    leaf = entry.leaf_ref() if entry.leaf_ref is not None else None
    if leaf is not None:
        known = LEAF_DIGESTS.get(leaf, entry.spec)
        if known is not None:
            return known
    digest = digest_pieces(entry)
    if leaf is not None:
        LEAF_DIGESTS.put(leaf, entry.spec, digest)
    return digest


def digest_pieces(entry: ArrayEntry) -> str:
    """``"xxh3-64:<hex>"`` of an array's stored bytes: its spec, then each piece's box and
    bytes in box order."""
    h = xxhash.xxh3_64()
    spec = entry.spec
    h.update(f"{spec.dtype}|{spec.stored_dtype}|{spec.stored_shape}|{spec.key_impl}".encode())
    for piece in sorted(entry.pieces, key=lambda p: p.offset):
        data = np.ascontiguousarray(piece.data)
        h.update(np.asarray([*piece.offset, *data.shape], dtype=np.int64).tobytes())
        if data.nbytes:
            h.update(memoryview(data).cast("B"))
    return f"xxh3-64:{h.hexdigest()}"


def plan_carry(base_name: str, base: Version, entries: dict[str, list[ArrayEntry]],
               records: dict[str, ItemRecord], min_live: float = MIN_LIVE) -> Carry:
    """Which arrays of ``entries`` to carry from ``base`` (see module doc); the caller writes
    the others. ``records`` carry this save's digests."""
    carry = Carry(base_name, base.id)
    unchanged: set[tuple[str, str]] = set()
    for item, arrays in entries.items():
        old = base.manifest.items.get(item)
        if old is None:
            continue
        new_digests = records[item].digests
        for e in arrays:
            d = new_digests.get(e.key)
            if d is not None and old.arrays.get(e.key) == e.spec and old.digests.get(e.key) == d:
                unchanged.add((item, e.key))
    if not unchanged:
        return carry
    index = base.index()
    rows_of = {(item, key): list(index[item][key]) for item, key in unchanged}
    live: dict[str, int] = {}
    for (item, key), rows in rows_of.items():
        for fname, c in rows:
            live[fname] = live.get(fname, 0) + c.nbytes
    carried = set()
    while True:                         # drop files too dead to carry, and arrays left without them
        carried = {f for f, n in live.items() if n >= min_live * max(1, base.manifest.files[f].size)}
        keep = {ik for ik, rows in rows_of.items() if all(f in carried for f, _ in rows)}
        if keep == set(rows_of):
            break
        for ik in set(rows_of) - keep:
            for fname, c in rows_of.pop(ik):
                live[fname] -= c.nbytes
        live = {f: n for f, n in live.items() if n > 0}
    for (item, key), rows in rows_of.items():
        carry.rows.setdefault(item, {})[key] = rows
    carry.files = {f: base.manifest.files[f] for f in {f for rows in rows_of.values() for f, _ in rows}}
    return carry


def without_carried(entries: dict[str, list[ArrayEntry]], carry: Carry) -> dict[str, list[ArrayEntry]]:
    """The entries a save still writes."""
    return {item: [e for e in arrays if e.key not in carry.rows.get(item, {})] for item, arrays in entries.items()}
