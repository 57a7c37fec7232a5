"""Analyses of the encoders: analyze (per weights) and cka (between all trained encoders).

Inputs: DATA (results/prepare_data/dataset.safetensors, or manifest.jsonl when streamed) and the weights files (layout.weights_path).
Outputs (per seed): results/seed<S>/analyze/<weights>/{analysis.json,attention_heads.png}, results/seed<S>/cka/{cka.json,cka.png}.
"""


rule analyze:
    input:
        data=DATA,
        weights=weights_file,
    output:
        analysis="results/seed{seed}/analyze/{weights}/analysis.json",
        heads=report("results/seed{seed}/analyze/{weights}/attention_heads.png", category="analyses",
                     subcategory="cls attention per head"),
    params:
        preset=config["preset"],
        node=node_params("analyze"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/seed{seed}/logs/analyze/{weights}.log",
    benchmark:
        "results/seed{seed}/benchmarks/analyze/{weights}.tsv"
    shell:
        "python -m pipeline.stages.evaluation.analyze --preset {params.preset} --seed {wildcards.seed} --weights {wildcards.weights} > {log} 2>&1"


rule cka:
    input:
        data=DATA,
        weights=seed_weights,
    output:
        cka="results/seed{seed}/cka/cka.json",
        plot=report("results/seed{seed}/cka/cka.png", category="analyses"),
    params:
        preset=config["preset"],
        node=node_params("cka"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/seed{seed}/logs/cka.log",
    benchmark:
        "results/seed{seed}/benchmarks/cka.tsv"
    shell:
        "python -m pipeline.stages.evaluation.cka --preset {params.preset} --seed {wildcards.seed} > {log} 2>&1"
