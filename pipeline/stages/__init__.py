"""One CLI per DAG node: `python -m pipeline.stages.<node> --preset NAME [...]`."""
