"""shardckpt: sharded, atomic, verifiable checkpoints for JAX / Flax NNX / optax.

Public names only; everything else is internal and may change. The pytree core is
``save(path, tree)`` / ``restore(path, target)``; ``save_model``, ``load_model``,
``save_optimizer``, ``load_optimizer`` and ``CheckpointManager`` are built on it. Public
submodules: ``shardckpt.convert`` (Orbax conversion, safetensors export),
``shardckpt.ray_train`` (Ray Train) and ``shardckpt.testing`` (test hooks).

The names are loaded when first used (PEP 562): ``import shardckpt`` and the ``shardckpt``
command's ``--help`` do not import jax, flax or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

from shardckpt.release import __version__ as __version__

#: public name -> the module that defines it
PUBLIC = {
    "save": "shardckpt.api.core", "restore": "shardckpt.api.core",
    "save_model": "shardckpt.api.nnx", "load_model": "shardckpt.api.nnx",
    "save_optimizer": "shardckpt.api.nnx", "load_optimizer": "shardckpt.api.nnx",
    "CheckpointManager": "shardckpt.api.manager", "CheckpointState": "shardckpt.api.manager",
    "CheckpointInfo": "shardckpt.catalog", "MemoryTier": "shardckpt.api.tiers", "TierRestore": "shardckpt.api.tiers",
    "Checkpoint": "shardckpt.loading.checkpoint", "RestoreReport": "shardckpt.loading.checkpoint",
    "open_checkpoint": "shardckpt.loading.open",
    "CheckpointError": "shardckpt.errors", "CheckpointNotFoundError": "shardckpt.errors",
    "CorruptCheckpointError": "shardckpt.errors", "SaveAbortedError": "shardckpt.errors",
    "StructureMismatchError": "shardckpt.errors", "OrbaxCheckpointError": "shardckpt.errors",
    "OptimizerMismatchError": "shardckpt.errors",
    "LMModel": "shardckpt.lm.models", "ModelConfig": "shardckpt.lm.models",
    "VerifyReport": "shardckpt.tools.verify", "verify": "shardckpt.tools.verify",
}

__all__ = sorted([*PUBLIC, "__version__"])


def __getattr__(name: str) -> Any:
    module = PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'shardckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value          # later lookups do not come here
    return value


def __dir__() -> list[str]:
    return __all__
