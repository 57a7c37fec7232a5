"""One CLI per DAG node, `python -m pipeline.stages.<group>.<node> --preset NAME [...]`, in two groups: the
nodes that make data and weights (training/) and the nodes that evaluate weights and report (evaluation/)."""
TRAINING = ("prepare_data", "random_init", "import_weights", "pretrain", "pretrain_dbot", "supervised", "teacher_swap")
EVALUATION = ("knn", "linprobe", "segprobe", "finetune", "robustness", "checkpoint_eval", "analyze", "cka", "report")


def stage_module(node: str) -> str:
    """The module a node runs as: "pretrain" -> "pipeline.stages.training.pretrain"."""
    group = "training" if node in TRAINING else "evaluation" if node in EVALUATION else None
    if group is None:
        raise KeyError(f"no node CLI named {node!r}: known {TRAINING + EVALUATION}")
    return f"pipeline.stages.{group}.{node}"
