"""Node CLIs that make data and weights: `python -m pipeline.stages.training.<node>`."""
