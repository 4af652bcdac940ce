"""Benchmarks of the engine, run as ``python -m bench.engine``."""
