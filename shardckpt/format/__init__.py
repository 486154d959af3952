"""The on-disk format: pure bytes <-> values, no I/O (see docs/format.md)."""
