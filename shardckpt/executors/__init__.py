"""Executors run a save or read plan: the same plan, the same files, whoever runs it."""

from .base import Executor, ReadJob, ReadTarget
from .local import ThreadExecutor

__all__ = ["Executor", "ReadJob", "ReadTarget", "ThreadExecutor"]
