"""The study as one DAG: prepare_data -> random_init / pretrain / supervised / teacher_swap <-> pretrain_dbot
-> knn, linprobe, segprobe, finetune -> robustness, checkpoint_eval, analyze, cka -> report.

    snakemake --cores 2                         # the default study (params/base.yaml)
    snakemake --cores 2 --config preset=tiny    # a preset from params/presets/

Every rule is a node of the node table (pipeline/dag.py; rules/nodes.smk makes one rule per entry) and calls its
stage CLI, `python -m pipeline.stages.<group>.<node>`; dvc.yaml is generated from the same table and runs the same
commands. Each rule's inputs include the node's fingerprint (pipeline/orchestration/fingerprints.py: its command,
params and code), refreshed below, so an edit of any of them reruns exactly what it reaches; when the run ends,
what it built is recorded in DVC (pipeline/orchestration/record.py), so `dvc status` agrees.
"""
from snakemake.utils import min_version, validate

min_version("9.0")

from pipeline import config as params_config
from pipeline import dag, layout
from pipeline.orchestration import fingerprints

config.setdefault("preset", "default")
PARAMS = params_config.load(config["preset"], check_paths=False)   # strict (the schema and cross-field checks): a bad
                                                                   # key or value stops here; data.path is checked by
                                                                   # the nodes (a DAG needs only params)
validate(params_config.without_method_sections(PARAMS), "params/schema.yaml")   # methods' sections: by load, above
fingerprints.refresh(config["preset"], PARAMS)


include: "rules/common.smk"
include: "rules/nodes.smk"


onstart:
    start_forkserver()


onsuccess:
    record_in_dvc()


onerror:
    record_in_dvc()


rule all:
    default_target: True
    input:
        rules.report.output,
