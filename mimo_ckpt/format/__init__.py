"""The on-disk format: the manifest, safetensors shard files, checksums and the object encoding. Pure; no I/O."""
