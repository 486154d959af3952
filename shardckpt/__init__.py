"""shardckpt: sharded, atomic, verifiable checkpoints for JAX / Flax NNX / optax.

Public names only; everything else is internal and may change.
"""

__version__ = "0.1.0"

from .errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError,  # noqa: E402
                     SaveAbortedError, StructureMismatchError)
from .api import load_model, load_optimizer, save_model, save_optimizer  # noqa: E402
from .checkpoint import Checkpoint, RestoreReport, open_checkpoint  # noqa: E402
from .manager import CheckpointInfo, CheckpointManager, CheckpointState  # noqa: E402
from .models import LMModel, ModelConfig  # noqa: E402
from .verification import VerifyReport, verify  # noqa: E402

__all__ = [
    "save_model", "load_model", "save_optimizer", "load_optimizer",
    "CheckpointManager", "CheckpointState", "CheckpointInfo", "Checkpoint", "RestoreReport",
    "open_checkpoint", "LMModel", "ModelConfig", "verify", "VerifyReport",
    "CheckpointError", "CheckpointNotFoundError", "CorruptCheckpointError",
    "StructureMismatchError", "SaveAbortedError",
]
