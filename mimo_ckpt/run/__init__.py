"""The distributed runtime, the only layer with collectives: save, load, async save, the checkpoint manager."""
