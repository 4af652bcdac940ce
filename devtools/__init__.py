"""Helpers shared by the tests and the benchmarks: real processes (Redis, workers, the web) and databases."""
