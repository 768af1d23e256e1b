"""The data model: layouts, boxes, dtypes, shards of module state, and how layouts split tensors. Pure; no I/O."""
