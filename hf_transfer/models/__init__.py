"""Models: the presets, loading a checkpoint with a new head, and a backbone's structure (stem, blocks, head)."""
