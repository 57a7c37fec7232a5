"""The study as one DAG: prepare_data -> random_init / pretrain / supervised / teacher_swap <-> pretrain_dbot
-> knn, linprobe, analyze, cka -> report.

    snakemake --cores 2                         # the default study (params/base.yaml)
    snakemake --cores 2 --config preset=tiny    # a preset from params/presets/
Every rule calls a stage CLI, `python -m pipeline.stages.<group>.<rule>` (pipeline.stages.stage_module); dvc.yaml runs the same commands.
"""
from pipeline import config as params_config
from pipeline import layout

config.setdefault("preset", "default")
PARAMS = params_config.load(config["preset"], check_paths=False)   # strict (the schema and cross-field checks): a bad
                                                                   # key or value stops here; data.path is checked by
                                                                   # the nodes (a DAG needs only params)


include: "rules/common.smk"


wildcard_constraints:
    key="|".join(DBOT_KEYS),
    seed=r"\d+",
    method="|".join(layout.SINGLE_STAGE_METHODS),
    weights="|".join(PROBED),



include: "rules/data.smk"
include: "rules/pretrain.smk"
include: "rules/evaluate.smk"
include: "rules/analyze.smk"
include: "rules/report.smk"


onstart:
    start_forkserver()


rule all:
    input:
        rules.report.output,
