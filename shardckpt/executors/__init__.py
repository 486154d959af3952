"""Executors: who moves the bytes (``base.py``): threads here, Ray actors on every node, the
per-node chunk cache."""
