"""Stores: where checkpoint bytes live (``base.py``); ``registry.open_store`` / ``resolve``
turn what a user passes into a store, once."""
