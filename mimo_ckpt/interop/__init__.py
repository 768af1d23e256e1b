"""Other systems' state and formats: megatron-core's sharded state dicts and torch_dist checkpoints."""
