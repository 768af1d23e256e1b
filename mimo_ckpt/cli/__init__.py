"""The `mimo-ckpt` command line."""

from mimo_ckpt.cli.commands import main

__all__ = ["main"]
