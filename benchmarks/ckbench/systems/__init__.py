"""Systems under test; one module per system or family. See ``base.py``."""

from .base import ORBAX_DEFAULT, REGISTRY, Context, System, load_all, register

__all__ = ["ORBAX_DEFAULT", "REGISTRY", "Context", "System", "load_all", "register"]
