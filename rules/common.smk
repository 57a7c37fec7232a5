"""Helpers shared by every .smk file: params of a node (its rerun trigger) and wildcard -> path maps.

Inputs: PARAMS (resolved params) and config["preset"] from the Snakefile. Outputs: none.
Per-seed nodes write under results/seed{seed}/ (the {seed} wildcard runs over params seeds).
"""
import atexit
import json
import os
import sys

SEEDS = PARAMS["seeds"]
DBOT_KEYS = layout.dbot_keys(PARAMS)
WEIGHTS = layout.all_weights(PARAMS)              # every encoder of one seed
PROBED = layout.probe_weights(PARAMS)              # knn, linprobe: the encoders and the pixel floor
DATA = str(layout.dataset_path(PARAMS))           # what prepare_data writes: the tensor file, or a stream's manifest


def node_params(node):
    """The params the node reads (pipeline.orchestration.params_reads.NODE_PARAMS, as dvc.yaml's), with their
    values, as one string: Snakemake reruns the node when it changes."""
    from pipeline.orchestration import params_reads

    def get(wildcards):
        fields = dict(wildcards)
        if "key" in fields:                     # a dBOT node: {chain} and {stage} come from its key
            fields["chain"], fields["stage"] = layout.parse_dbot_key(fields["key"])
        out = {}
        for key in params_reads.declared(node, **fields):
            value = PARAMS
            for part in key.split("."):
                value = value[part]
            out[key] = value
        return json.dumps(out, sort_keys=True)

    return get


def teacher_source(wildcards):
    """Stage 0: the chain's entry in params dbot.chains; stage k: stage k-1's student of the same chain."""
    return layout.teacher_source(PARAMS, wildcards.key, int(wildcards.seed))


def carried_optimizer(wildcards):
    """dBOT stage k's extra input when dbot.carry_optimizer_state is on: stage k-1's optimizer.pt (none for stage 0)."""
    path = layout.carried_optimizer(PARAMS, wildcards.key, int(wildcards.seed))
    return [str(path)] if path else []


def weights_file(wildcards):
    """The encoder file of {weights}; for the pixel floor, the prepared dataset."""
    return str(layout.weights_path(wildcards.weights, int(wildcards.seed)))


def seed_weights(wildcards):
    """Every encoder of one seed (cka's inputs)."""
    return [str(layout.weights_path(w, int(wildcards.seed))) for w in WEIGHTS]


def kept(weights, node_dir):
    """The intermediate encoders a training node keeps (pretrain.keep_every_epochs), as output paths."""
    return [f"{node_dir}/checkpoints/epoch{e}.{ext}" for e in layout.kept_epochs(PARAMS, weights)
            for ext in ("safetensors", "json")]


def checkpoint_eval_inputs(wildcards):
    """The kept encoders, the final knn/linprobe metrics and the training metrics of checkpoint_eval."""
    return [str(p) for p in layout.checkpoint_eval_inputs(PARAMS, wildcards.weights, int(wildcards.seed))]


def start_forkserver():
    """Nodes of a local run start warm: a fork server (pipeline.orchestration.forkserver) for this Snakemake process's lifetime.

    Off with --config forkserver=0, off Linux, and for jobs that do not run on this machine (an executor plugin
    such as slurm); nodes that start before it has imported torch and the rest (~5 s) start cold."""
    wanted = str(config.get("forkserver", 1)).lower() not in ("0", "false", "no")
    if not wanted or sys.platform != "linux" or not workflow.executor_plugin.common_settings.local_exec:
        return
    from pipeline.orchestration import forkserver

    proc, path = forkserver.start(parent=os.getpid(), wait=False)
    atexit.register(forkserver.stop, proc, path)
    os.environ[forkserver.ENV] = path
