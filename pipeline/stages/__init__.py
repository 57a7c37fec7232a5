"""One CLI per DAG node, `python -m pipeline.stages.<group>.<node> --preset NAME [...]`, in two groups: the
nodes that make data and weights (training/) and the nodes that evaluate weights and report (evaluation/). Which
node is in which group, and everything else about it, is its entry in the node table (pipeline/dag.py)."""
from pipeline.dag import stage_module  # noqa: F401  (the name the tests and benchmarks use)
