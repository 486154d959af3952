"""The reference model of the guide (``LMModel``) and its training loop: plain Flax code,
importing nothing of shardckpt."""
