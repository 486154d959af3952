"""The API: the pytree core, the nnx functions, the manager, Ray Train, and how a save runs
(``session.py``). Public names are re-exported by ``shardckpt``."""
