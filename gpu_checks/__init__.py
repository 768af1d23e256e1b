"""Checks that need a GPU; results in docs/results/."""
