"""Pre-training: pretrain (single-stage methods), supervised, teacher_swap and pretrain_dbot (the dBOT chain).

Inputs: results/prepare_data/dataset.safetensors; dBOT stage k also results/teacher_swap/stage<k>/teacher.safetensors.
Outputs: results/pretrain/<method>/, results/supervised/ and results/pretrain_dbot/stage<k>/: encoder.{safetensors,json}, metrics.json;
results/teacher_swap/stage<k>/teacher.{safetensors,json}.
"""


rule pretrain:
    input:
        data="results/prepare_data/dataset.safetensors",
    output:
        weights="results/pretrain/{method}/encoder.safetensors",
        meta="results/pretrain/{method}/encoder.json",
        metrics="results/pretrain/{method}/metrics.json",
    params:
        preset=config["preset"],
        node=node_params("seed", "data", "model", "pretrain", "{method}"),
    threads: 2
    conda:
        "envs/pipeline.yaml"
    log:
        "results/logs/pretrain/{method}.log",
    benchmark:
        "results/benchmarks/pretrain/{method}.tsv"
    shell:
        "python -m pipeline.stages.pretrain --preset {params.preset} --method {wildcards.method} > {log} 2>&1"


rule supervised:
    input:
        data="results/prepare_data/dataset.safetensors",
    output:
        weights="results/supervised/encoder.safetensors",
        meta="results/supervised/encoder.json",
        metrics="results/supervised/metrics.json",
    params:
        preset=config["preset"],
        node=node_params("seed", "data", "model", "pretrain", "supervised"),
    threads: 2
    conda:
        "envs/pipeline.yaml"
    log:
        "results/logs/supervised.log",
    benchmark:
        "results/benchmarks/supervised.tsv"
    shell:
        "python -m pipeline.stages.supervised --preset {params.preset} > {log} 2>&1"


rule teacher_swap:
    input:
        source=teacher_source,
    output:
        weights="results/teacher_swap/stage{stage}/teacher.safetensors",
        meta="results/teacher_swap/stage{stage}/teacher.json",
    params:
        preset=config["preset"],
        node=node_params("data", "model", "dbot.stage0_teacher"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/logs/teacher_swap/stage{stage}.log",
    benchmark:
        "results/benchmarks/teacher_swap/stage{stage}.tsv"
    shell:
        "python -m pipeline.stages.teacher_swap --preset {params.preset} --stage stage{wildcards.stage} > {log} 2>&1"


rule pretrain_dbot:
    input:
        data="results/prepare_data/dataset.safetensors",
        teacher="results/teacher_swap/stage{stage}/teacher.safetensors",
    output:
        weights="results/pretrain_dbot/stage{stage}/encoder.safetensors",
        meta="results/pretrain_dbot/stage{stage}/encoder.json",
        metrics="results/pretrain_dbot/stage{stage}/metrics.json",
    params:
        preset=config["preset"],
        node=node_params("seed", "data", "model", "pretrain", "dbot.beta", "dbot.target_norm",
                         "dbot.teacher_final_norm", "dbot.stages.stage{stage}"),
    threads: 2
    conda:
        "envs/pipeline.yaml"
    log:
        "results/logs/pretrain_dbot/stage{stage}.log",
    benchmark:
        "results/benchmarks/pretrain_dbot/stage{stage}.tsv"
    shell:
        "python -m pipeline.stages.pretrain_dbot --preset {params.preset} --stage stage{wildcards.stage} > {log} 2>&1"
