"""Single-process tools over stored checkpoints: reshard, export, diff, verify, the layout picture, progress."""
