"""Examples to copy: the demo and the megatron-core MimoModel run."""
