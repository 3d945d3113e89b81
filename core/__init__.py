"""The shared base below `train/`, `lower/`, `runtime/` and `benchmarks/`: errors, the CLI toolkit, atomic
file writes and hashing, the cache and data folders, and the pixel normalization every stage agrees on.

Nothing here imports the other packages (`tests/test_layout.py` checks the import directions).
"""
