"""Masked image modeling with teacher networks: MAE, dBOT and friends, as one reproducible DAG."""
