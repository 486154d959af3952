"""Constants, process environment and file-system helpers shared by every module."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# If something outside kills our local Ray (a `ray stop` elsewhere on a shared machine), the
# driver would exit after 60 s without its GCS; stay alive and restart Ray instead.
os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "3600")

import warnings

warnings.filterwarnings("ignore")

PKG = Path(__file__).resolve().parent          # benchmarks/ckbench
BENCH_DIR = PKG.parent                          # benchmarks/
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GB = 1e9
DIRECT_BLOCK = 4096
IO_BLOCK = 16 << 20


def data_files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in data_files(path))


def fsync_dir(path: Path) -> None:
    """fsync a directory (or a file: the same call)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cache(path: Path) -> None:
    """Evict ``path``'s files from the page cache (fsync first: dirty pages stay cached)."""
    for p in data_files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(path: Path) -> None:
    """Read every file once so it sits in the page cache."""
    buf = bytearray(IO_BLOCK)
    for p in data_files(path):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def set_cache(path: Path, cache: str) -> None:
    """``hot``: every file of ``path`` in the page cache; ``cold``: none of them."""
    (warm_cache if cache == "hot" else drop_cache)(path)


def rmtree(path: Path) -> None:
    path = Path(path)
    if path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def split_two(sizes: list[int]) -> list[list[int]]:
    """Indices of ``sizes`` in two groups of nearly equal total (largest first)."""
    groups, loads = [[], []], [0, 0]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        g = loads.index(min(loads))
        groups[g].append(i)
        loads[g] += sizes[i]
    return groups


def parallel(fns: list[Callable[[], None]]) -> None:
    """Run ``fns`` in one thread each; re-raise the first error."""
    errors = []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
