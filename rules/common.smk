"""Helpers shared by every .smk file: params of a node (its rerun trigger) and wildcard -> path maps.

Inputs: PARAMS (resolved params) and config["preset"] from the Snakefile. Outputs: none.
"""
import json

DBOT_STAGES = layout.dbot_stages(PARAMS)
WEIGHTS = layout.all_weights(PARAMS)


def node_params(*keys):
    """The params a node reads, as one string: Snakemake reruns the node when it changes."""

    def get(wildcards):
        out = {}
        for key in keys:
            value = PARAMS
            for part in key.format(**wildcards).split("."):
                value = value[part]
            out[key.format(**wildcards)] = value
        return json.dumps(out, sort_keys=True)

    return get


def teacher_source(wildcards):
    """Stage 0: params dbot.stage0_teacher (the random init by default); stage k: stage k-1's student."""
    stage = int(wildcards.stage)
    if stage == 0:
        return PARAMS["dbot"]["stage0_teacher"]
    return str(layout.weights_path(f"dbot_stage{stage - 1}"))


def weights_file(wildcards):
    return str(layout.weights_path(wildcards.weights))
