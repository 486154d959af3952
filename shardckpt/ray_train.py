"""Ray Train integration: the public names (the implementation is
``shardckpt.api.ray_train``; it needs ``pip install 'shardckpt[train]'``)."""

from shardckpt.api.ray_train import PREFIX, RayTrainCheckpointer

__all__ = ["PREFIX", "RayTrainCheckpointer"]
