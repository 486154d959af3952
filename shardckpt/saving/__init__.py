"""Saving: the one pipeline (``pipeline.py``), shard planning, the committer, metrics. (Not
``save``: a subpackage of that name would shadow the public function ``shardckpt.save``.)"""
