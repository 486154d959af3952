"""Coordinators: who agrees that every part of a save is written (see base.py)."""
