"""Benchmarks and probes; results and commands in docs/performance.md."""
