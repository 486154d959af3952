"""The tools: the ``shardckpt`` command, ``inspect``, ``verify``, Orbax conversion, export and
the demo; all through the Store, so each works on every store."""
