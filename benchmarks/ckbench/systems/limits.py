"""The machine's limits: no format, no checksum, just the bytes.

* ``raw_write_direct`` / ``raw_write_buffered``: two threads write the state's bytes to two
  new files and fsync them: ``O_DIRECT`` from one page-aligned copy of the state (so the disk
  alone is measured), or buffered from the arrays themselves. The limit for saves is the
  faster of the two.
* ``raw_read``: two threads read shardckpt's shard files into newly allocated memory, page
  cache hot or cold: the limit for restores.
* ``memcpy``: one thread copies every array of the state into newly allocated memory
  (shown, not used as a limit).
"""

from __future__ import annotations

import gc
import mmap
import os

from ..common import DIRECT_BLOCK, IO_BLOCK, data_files, fsync_dir, parallel, split_two
from ..states import flat_host_arrays
from .base import System, register


class Limit(System):
    family = "limit"
    measure_memory = False

    def op_name(self, action, cache=None):
        return self.name + (f"_{cache}" if cache else "")

    def op_label(self, action, cache=None):
        return self.label + (f" [{cache} cache]" if cache else "")

    def result_leaves(self, result):
        return None


class RawWrite(Limit):
    limit_of = "write"
    direct = False

    def setup(self):
        self.arrays = list(flat_host_arrays(self.ctx.state.items).values())
        if self.direct:
            total = sum(a.nbytes for a in self.arrays)
            half = -(-total // 2 // DIRECT_BLOCK) * DIRECT_BLOCK
            self.half = half
            self.buf = mmap.mmap(-1, 2 * half)
            view, pos = memoryview(self.buf), 0
            for a in self.arrays:
                view[pos:pos + a.nbytes] = memoryview(a).cast("B")
                pos += a.nbytes
            view.release()

    def teardown(self):
        if self.direct:
            self.buf.close()

    def cleanup(self, action, path):
        for p in self.paths:
            p.unlink(missing_ok=True)

    def save(self, state, path):
        paths = [path.with_name(f"{path.name}_part{i}") for i in range(2)]

        def writer_buffered(path, idx):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for i in idx:
                    view = memoryview(self.arrays[i]).cast("B")
                    while len(view):
                        view = view[os.write(fd, view[:IO_BLOCK]):]
                os.fsync(fd)
            finally:
                os.close(fd)

        def writer_direct(path, part):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
            view = memoryview(self.buf)[part * self.half:(part + 1) * self.half]
            try:
                pos = 0
                while pos < len(view):
                    pos += os.write(fd, view[pos:pos + IO_BLOCK])
                os.fsync(fd)
            finally:
                view.release()
                os.close(fd)

        if self.direct:
            parallel([lambda p=p, i=i: writer_direct(p, i) for i, p in enumerate(paths)])
        else:
            groups = split_two([a.nbytes for a in self.arrays])
            parallel([lambda p=p, g=g: writer_buffered(p, g) for p, g in zip(paths, groups)])
        fsync_dir(path.parent)
        self.paths = paths


@register
class RawWriteDirect(RawWrite):
    name = "raw_write_direct"
    label = "raw 2-thread write + fsync (O_DIRECT)"
    direct = True


@register
class RawWriteBuffered(RawWrite):
    name = "raw_write_buffered"
    label = "raw 2-thread write + fsync (buffered)"


@register
class RawRead(Limit):
    name = "raw_read"
    label = "raw 2-thread read into new memory"
    limit_of = "read"
    restores_from = "shardckpt"

    def restore(self, path, target):
        import numpy as np
        files = [p for p in data_files(path) if p.suffix == ".npz"]
        sizes = [p.stat().st_size for p in files]
        out = [None] * len(files)

        def reader(idx):
            for i in idx:
                buf = np.empty(sizes[i], np.uint8)
                view = memoryview(buf)
                fd = os.open(files[i], os.O_RDONLY)
                try:
                    pos = 0
                    while pos < sizes[i]:
                        n = os.preadv(fd, [view[pos:pos + IO_BLOCK]], pos)
                        if n <= 0:
                            break
                        pos += n
                finally:
                    os.close(fd)
                out[i] = buf

        parallel([lambda g=g: reader(g) for g in split_two(sizes)])
        return out


@register
class Memcpy(Limit):
    name = "memcpy"
    label = "memcpy of the state into new memory (1 thread)"

    def setup(self):
        self.arrays = list(flat_host_arrays(self.ctx.state.items).values())

    def save(self, state, path):
        import numpy as np
        out = []
        for a in self.arrays:
            d = np.empty_like(a)
            np.copyto(d, a)
            out.append(d)
        self.result = out

    def cleanup(self, action, path):
        self.result = None
        gc.collect()
