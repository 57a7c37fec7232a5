"""Training: the one training loop and data-parallel processes."""
