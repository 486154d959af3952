"""Exception types of shardckpt.

Every error a user can cause (a bad path, a damaged file, a model that does not fit the
checkpoint) is one of these, so callers can catch ``CheckpointError`` and know that nothing
already saved was harmed. Messages always name the path, file, key or option at fault.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class: a checkpoint could not be saved, found, read or trusted."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path (or step) does not hold a committed checkpoint."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files disagree with its manifest (checksum, size, layout) or the
    manifest itself is malformed or hostile."""


class StructureMismatchError(CheckpointError):
    """The restore target (model, optimizer, shardings) does not match what was saved."""


class OptimizerMismatchError(StructureMismatchError):
    """The saved optimizer state is not the state of the optimizer asked for (another
    ``tx=``, another ``wrt=``): restoring it would restart parts of it (Adam's count, a
    schedule's step) silently. The message says what was saved and what to pass."""


class SaveAbortedError(CheckpointError):
    """A save failed part-way; nothing of it became visible and earlier checkpoints are
    untouched."""


class ReplacedWhileReadingError(CheckpointNotFoundError):
    """The checkpoint being read was replaced by another save of the same path, or deleted
    by retention, in another process meanwhile. The version that was opened is gone;
    nothing read from it is returned. The load functions retry on it."""


class OrbaxCheckpointError(CheckpointNotFoundError):
    """A shardckpt load was pointed at an Orbax checkpoint (the message says how to convert
    it)."""
