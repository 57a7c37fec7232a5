"""Evaluation of every encoder of the study: knn and linprobe.

Inputs: results/prepare_data/dataset.safetensors and the weights file of {weights} (layout.weights_path).
Outputs: results/knn/{weights}/metrics.json, results/linprobe/{weights}/metrics.json.
"""


rule knn:
    input:
        data="results/prepare_data/dataset.safetensors",
        weights=weights_file,
    output:
        metrics="results/knn/{weights}/metrics.json",
    params:
        preset=config["preset"],
        node=node_params("knn"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/logs/knn/{weights}.log",
    benchmark:
        "results/benchmarks/knn/{weights}.tsv"
    shell:
        "python -m pipeline.stages.knn --preset {params.preset} --weights {wildcards.weights} > {log} 2>&1"


rule linprobe:
    input:
        data="results/prepare_data/dataset.safetensors",
        weights=weights_file,
    output:
        metrics="results/linprobe/{weights}/metrics.json",
    params:
        preset=config["preset"],
        node=node_params("seed", "linprobe"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/logs/linprobe/{weights}.log",
    benchmark:
        "results/benchmarks/linprobe/{weights}.tsv"
    shell:
        "python -m pipeline.stages.linprobe --preset {params.preset} --weights {wildcards.weights} > {log} 2>&1"
