"""Training: data preparation, the memory-lean causal-LM loss, and the training loop."""
