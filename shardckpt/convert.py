"""Orbax <-> shardckpt conversion and safetensors export: the public names (the
implementations are ``shardckpt.tools.convert`` and ``shardckpt.tools.export``)."""

from shardckpt.errors import OrbaxCheckpointError
from shardckpt.tools.convert import ConvertReport, convert, from_orbax, read_orbax_tree, to_orbax
from shardckpt.tools.export import export_safetensors

__all__ = ["ConvertReport", "OrbaxCheckpointError", "convert", "export_safetensors", "from_orbax", "orbax_kind",
           "read_orbax_tree", "to_orbax"]


def orbax_kind(path) -> str | None:
    """What kind of Orbax directory ``path`` is ("standard", "pytree", "step", "manager"),
    or None."""
    from shardckpt.loading.open import orbax_kind as kind_in
    from shardckpt.store.registry import resolve
    return kind_in(*resolve(path))
