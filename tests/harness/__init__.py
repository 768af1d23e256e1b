"""Helpers that start local process worlds for tests, benchmarks and the demo."""
