"""Benchmarks: `python -m benchmarks.run` (make bench) and `python -m benchmarks.load`."""
