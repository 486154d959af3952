"""Orbax: the default ``StandardCheckpointer`` (+ the async ``CheckpointManager``), and its
best settings as separate systems (``PyTreeCheckpointHandler`` options of orbax-checkpoint
0.12: ``use_compression``, ``use_ocdbt``, ``use_zarr3``, ``save_concurrent_gb``,
``restore_concurrent_gb``, and ``PyTreeSave(ocdbt_target_data_file_size=...)``).

Every save is durable the way Orbax makes it (TensorStore fsyncs, then Orbax's atomic
rename/commit) and waits for ``wait_until_finished()``. Add a variant: subclass
``OrbaxVariant`` with a new ``name`` and ``handler_kwargs``.
"""

from __future__ import annotations

from typing import ClassVar

from .base import System, register


def _quiet_absl() -> None:
    """Orbax logs a WARNING per save without OCDBT ("Skipping merge of OCDBT checkpoints")."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)


@register
class OrbaxDefault(System):
    """``StandardCheckpointer().save(path, items)`` + ``wait_until_finished()``; restore
    ``StandardCheckpointer().restore(path, target)``; async: ``CheckpointManager(dir).save(step,
    args=StandardSave(items))`` return (*blocking*), then ``wait_until_finished()`` (*total*),
    a new manager in a new directory for every sample (created and closed untimed)."""

    name = "orbax"
    label = "Orbax StandardCheckpointer (defaults)"
    family = "orbax"

    def setup(self):
        import orbax.checkpoint as ocp
        _quiet_absl()
        self.ckptr = ocp.StandardCheckpointer()

    def teardown(self):
        self.ckptr.close()

    def save(self, state, path):
        self.ckptr.save(path, state.items)
        self.ckptr.wait_until_finished()

    def prepare(self, action):
        if action == "async":
            import orbax.checkpoint as ocp
            self.async_dir = self.ctx.sub(f"{self.name}_async") / f"run_{self.ctx.next_step()}"
            self.mgr = ocp.CheckpointManager(self.async_dir)

    def async_save(self, state, path):
        import orbax.checkpoint as ocp
        self.mgr.save(self.ctx.next_step(), args=ocp.args.StandardSave(state.items))
        return self.async_dir, self.mgr.wait_until_finished

    def cleanup(self, action, path):
        if action == "async":
            self.mgr.close()
        super().cleanup(action, path)

    def restore(self, path, target):
        import jax
        out = self.ckptr.restore(path, target)
        jax.block_until_ready(out)
        return out

    def op_label(self, action, cache=None):
        if action == "async":
            return "Orbax async CheckpointManager (defaults)"
        return super().op_label(action, cache)


class OrbaxVariant(System):
    """``AsyncCheckpointer(PyTreeCheckpointHandler(**handler_kwargs))``: ``save(path,
    args=PyTreeSave(items, **save_kwargs))`` + ``wait_until_finished()``; restore with
    ``PyTreeRestore(target, restore_args=construct_restore_args(target))``."""

    family = "orbax"
    handler_kwargs: ClassVar[dict] = {}
    save_kwargs: ClassVar[dict] = {}

    def setup(self):
        import orbax.checkpoint as ocp
        _quiet_absl()
        self.ckptr = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(**self.handler_kwargs))

    def teardown(self):
        self.ckptr.close()

    def save(self, state, path):
        import orbax.checkpoint as ocp
        self.ckptr.save(path, args=ocp.args.PyTreeSave(state.items, **self.save_kwargs))
        self.ckptr.wait_until_finished()

    def restore(self, path, target):
        import jax
        import orbax.checkpoint as ocp
        args = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
        out = self.ckptr.restore(path, args=args)
        jax.block_until_ready(out)
        return out


@register
class OrbaxNoCompression(OrbaxVariant):
    name = "orbax_nocomp"
    label = "Orbax (compression off, OCDBT on)"
    handler_kwargs: ClassVar[dict] = {"use_compression": False}


@register
class OrbaxNoOcdbt(OrbaxVariant):
    name = "orbax_noocdbt"
    label = "Orbax (OCDBT off)"
    handler_kwargs: ClassVar[dict] = {"use_ocdbt": False}


@register
class OrbaxNoCompressionNoOcdbt(OrbaxVariant):
    name = "orbax_nocomp_noocdbt"
    label = "Orbax (compression off, OCDBT off)"
    handler_kwargs: ClassVar[dict] = {"use_compression": False, "use_ocdbt": False}


@register
class OrbaxZarr3(OrbaxVariant):
    name = "orbax_zarr3"
    label = "Orbax (zarr3, compression off, OCDBT on)"
    handler_kwargs: ClassVar[dict] = {"use_zarr3": True, "use_compression": False}


@register
class OrbaxConcurrent(OrbaxVariant):
    """More bytes in flight than the state (``save_concurrent_gb``/``restore_concurrent_gb``)
    and OCDBT data files split at 64 MiB, so several files are written in parallel."""

    name = "orbax_nocomp_conc"
    label = "Orbax (compression off, OCDBT on, 64 GB in flight, 64 MiB files)"
    handler_kwargs: ClassVar[dict] = {"use_compression": False, "save_concurrent_gb": 64, "restore_concurrent_gb": 64}
    save_kwargs: ClassVar[dict] = {"ocdbt_target_data_file_size": 64 << 20}
