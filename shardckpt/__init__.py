"""shardckpt: sharded, atomic, verifiable checkpoints for JAX / Flax NNX / optax.

Public names only; everything else is internal and may change. The pytree core is
``save(path, tree)`` / ``restore(path, target)``; ``save_model``, ``load_model``,
``save_optimizer``, ``load_optimizer`` and ``CheckpointManager`` are built on it.
"""

__version__ = "0.1.0"   # first: transaction.py imports it while the package loads

from .api import load_model, load_optimizer, restore, save, save_model, save_optimizer
from .checkpoint import Checkpoint, RestoreReport, open_checkpoint
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    SaveAbortedError,
    StructureMismatchError,
)
from .manager import CheckpointInfo, CheckpointManager, CheckpointState
from .models import LMModel, ModelConfig
from .verification import VerifyReport, verify

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointState",
    "CorruptCheckpointError",
    "LMModel",
    "ModelConfig",
    "RestoreReport",
    "SaveAbortedError",
    "StructureMismatchError",
    "VerifyReport",
    "load_model",
    "load_optimizer",
    "open_checkpoint",
    "restore",
    "save",
    "save_model",
    "save_optimizer",
    "verify",
]
