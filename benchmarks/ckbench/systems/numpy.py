"""``np.savez`` of every leaf (+ fsync of the file and directory); ``np.load`` -> ``jnp.asarray``."""

from __future__ import annotations

import os

from ..common import fsync_dir
from ..states import flat_host_arrays
from .base import System, register


@register
class Npz(System):
    name = "npz"
    label = "np.savez / np.load"
    family = "numpy"

    def save(self, state, path):
        import numpy as np
        path = path.with_suffix(".npz")
        flat = flat_host_arrays(state.items)
        np.savez(path, **flat)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        fsync_dir(path.parent)
        return path

    def make_source(self, path):
        import numpy as np
        path.mkdir(parents=True, exist_ok=True)
        p = path / "state.npz"
        np.savez(p, **flat_host_arrays(self.ctx.state.items))
        return p

    def restore(self, path, target):
        import jax
        import jax.numpy as jnp
        import numpy as np
        with np.load(path) as z:
            out = {k: jnp.asarray(z[k]) for k in z.files}
        jax.block_until_ready(out)
        return out

    def result_leaves(self, result):
        return list(result.values())

    def op_label(self, action, cache=None):
        return {"save": "np.savez + fsync", "restore": "np.load -> jnp.asarray"}[action] + \
            (f" [{cache} cache]" if cache else "")
