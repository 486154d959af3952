"""Reading: what a directory is (``open.py``, the only layout check), the validated reader
(``checkpoint.py``), the original single-file layout (``legacy.py``) and restore geometry.
(Not ``load``: ``shardckpt.load_*`` are public functions; ``saving`` is named alike because a
subpackage ``save`` would shadow the public ``shardckpt.save``.)"""
