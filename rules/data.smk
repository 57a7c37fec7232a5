"""prepare_data (one split for every seed) and random_init (per seed).

Inputs: the dataset named by params data.* (embedded ones need no file).
Outputs: DATA + its sidecar: results/prepare_data/dataset.{safetensors,json}, or manifest.{jsonl,json} for a
streamed image folder (data.format, layout.dataset_path); results/seed<S>/random_init/encoder.{safetensors,json}.
"""


rule prepare_data:
    output:
        data=DATA,
        meta=str(layout.sidecar(DATA)),
    params:
        preset=config["preset"],
        node=node_params("prepare_data"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/logs/prepare_data.log",
    benchmark:
        "results/benchmarks/prepare_data.tsv"
    shell:
        "python -m pipeline.stages.training.prepare_data --preset {params.preset} > {log} 2>&1"


rule random_init:
    input:
        data=DATA,
    output:
        weights="results/seed{seed}/random_init/encoder.safetensors",
        meta="results/seed{seed}/random_init/encoder.json",
    params:
        preset=config["preset"],
        node=node_params("random_init"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/seed{seed}/logs/random_init.log",
    benchmark:
        "results/seed{seed}/benchmarks/random_init.tsv"
    shell:
        "python -m pipeline.stages.training.random_init --preset {params.preset} --seed {wildcards.seed} > {log} 2>&1"
