"""Files in and out: checkpoints (read, write, slices), loading and saving models, assets (the
tokenizer download, the caches) and the bundled demo model."""
