"""Node CLIs that evaluate weights and report: `python -m pipeline.stages.evaluation.<node>`."""
