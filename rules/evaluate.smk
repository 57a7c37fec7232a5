"""Evaluation of every encoder of the study: knn and linprobe.

Inputs: results/prepare_data/dataset.safetensors and the weights file of {weights} (layout.weights_path).
Outputs (per seed): results/seed<S>/knn/<weights>/metrics.json, results/seed<S>/linprobe/<weights>/metrics.json.
"""


rule knn:
    input:
        data="results/prepare_data/dataset.safetensors",
        weights=weights_file,
    output:
        metrics="results/seed{seed}/knn/{weights}/metrics.json",
    params:
        preset=config["preset"],
        node=node_params("knn"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/seed{seed}/logs/knn/{weights}.log",
    benchmark:
        "results/seed{seed}/benchmarks/knn/{weights}.tsv"
    shell:
        "python -m pipeline.stages.knn --preset {params.preset} --seed {wildcards.seed} --weights {wildcards.weights} > {log} 2>&1"


rule linprobe:
    input:
        data="results/prepare_data/dataset.safetensors",
        weights=weights_file,
    output:
        metrics="results/seed{seed}/linprobe/{weights}/metrics.json",
    params:
        preset=config["preset"],
        node=node_params("linprobe"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/seed{seed}/logs/linprobe/{weights}.log",
    benchmark:
        "results/seed{seed}/benchmarks/linprobe/{weights}.tsv"
    shell:
        "python -m pipeline.stages.linprobe --preset {params.preset} --seed {wildcards.seed} --weights {wildcards.weights} > {log} 2>&1"
