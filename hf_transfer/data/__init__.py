"""Data on the CPU: loading a data set, decoding and augmenting each sample in uint8, stacking batches."""
