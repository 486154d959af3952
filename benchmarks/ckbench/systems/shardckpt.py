"""shardckpt through its public API: ``CheckpointManager`` saves, ``Checkpoint.restore``.

Internal names used: ``shardckpt.executors.ray.RayExecutor`` (``get``) for restores on Ray
writers (see also ``ckbench/raysupport.py``).
"""

from __future__ import annotations

from pathlib import Path

from .base import System, register


@register
class Shardckpt(System):
    """Threads backend: durable ``CheckpointManager.save``; async save with a second manager
    (``async_save=True``): *blocking* = ``save`` returns, *total* = ``wait_until_finished``."""

    name = "shardckpt"
    label = "shardckpt (threads)"
    family = "shardckpt"
    backend = "threads"
    executor = None

    def setup(self):
        from shardckpt import CheckpointManager
        self.mgr = CheckpointManager(self.ctx.sub(f"{self.name}_save"), max_to_keep=None, backend=self.backend,
                                     progress=False, save_timeout=180)
        self.amgr = None
        if self.can("async_save"):
            self.amgr = CheckpointManager(self.ctx.sub(f"{self.name}_async"), max_to_keep=None, backend=self.backend,
                                          async_save=True, progress=False)

    def teardown(self):
        self.mgr.close()
        if self.amgr is not None:
            self.amgr.close()

    def save(self, state, path):
        return self.mgr.save(self.ctx.next_step(), state.model, state.opt)

    def async_save(self, state, path):
        written = self.amgr.save(self.ctx.next_step(), state.model, state.opt)
        return written, self.amgr.wait_until_finished

    def make_source(self, path: Path) -> Path:
        from shardckpt import CheckpointManager
        with CheckpointManager(path, max_to_keep=None, backend="threads", progress=False) as m:
            return m.save(0, self.ctx.state.model, self.ctx.state.opt)

    def prepare(self, action):
        self.executor = None

    def restore(self, path, target):
        import jax

        from shardckpt import Checkpoint
        ck = Checkpoint(path)
        out = {name: ck.restore(name, t, progress=False, executor=self.executor)[0] for name, t in target.items()}
        jax.block_until_ready(out)
        return out


@register
class ShardckptRay(Shardckpt):
    """Ray backend (one writer per node): durable save; restore of the threads checkpoint
    with Ray readers, page cache hot."""

    name = "shardckpt_ray"
    label = "shardckpt (ray)"
    backend = "ray"
    needs_ray = True
    restores_from = "shardckpt"
    restore_caches = ("hot",)
    measure_memory = False      # the bytes live in Ray's worker processes and object store

    async_save = System.async_save     # not measured for Ray

    def prepare(self, action):
        self.executor = None
        if action == "restore":
            from shardckpt.executors.ray import RayExecutor
            self.executor = RayExecutor.get(None, 180)


@register
class ShardckptNnx(Shardckpt):
    """What a resuming training script calls: ``CheckpointManager.load_latest(tx=...)`` on
    the threads checkpoint. For the ``lm`` state the model comes from the saved config (an
    abstract ``LMModel`` built with ``nnx.eval_shape``, then filled); for the other states
    (their module classes are the benchmark's own) into a model built untimed in ``prepare``.
    The optimizer target is traced from the parameters only. The row shows the nnx
    adapter's cost next to ``Checkpoint.restore`` of prebuilt abstract targets."""

    name = "shardckpt_nnx"
    label = "shardckpt load_latest(tx=)"
    restores_from = "shardckpt"
    measure_memory = False      # the same reads as "shardckpt (threads)" restore

    save = System.save
    async_save = System.async_save

    def setup(self):
        pass

    def teardown(self):
        pass

    def prepare(self, action):
        from ..states import KINDS
        spec = self.ctx.state.spec
        self.model = None if spec["kind"] == "lm" else KINDS[spec["kind"]][1](spec)

    def restore(self, path, target):
        import jax
        import optax
        from flax import nnx

        from shardckpt import CheckpointManager

        with CheckpointManager(Path(path).parent, max_to_keep=None, progress=False) as mgr:
            loaded = mgr.load_latest(model=self.model, tx=optax.adamw(1e-4))
        self.model = None
        out = {"model": nnx.state(loaded.model), "optimizer": nnx.state(loaded.optimizer)}
        jax.block_until_ready(out)
        return out
