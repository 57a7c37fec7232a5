"""Analyses of the encoders: analyze (per weights) and cka (between all trained encoders).

Inputs: results/prepare_data/dataset.safetensors and the weights files (layout.weights_path).
Outputs: results/analyze/{weights}/{analysis.json,attention_heads.png}, results/cka/{cka.json,cka.png}.
"""


rule analyze:
    input:
        data="results/prepare_data/dataset.safetensors",
        weights=weights_file,
    output:
        analysis="results/analyze/{weights}/analysis.json",
        heads=report("results/analyze/{weights}/attention_heads.png", category="analyses",
                     subcategory="cls attention per head"),
    params:
        preset=config["preset"],
        node=node_params("seed", "analyze"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/logs/analyze/{weights}.log",
    benchmark:
        "results/benchmarks/analyze/{weights}.tsv"
    shell:
        "python -m pipeline.stages.analyze --preset {params.preset} --weights {wildcards.weights} > {log} 2>&1"


rule cka:
    input:
        data="results/prepare_data/dataset.safetensors",
        weights=[str(layout.weights_path(w)) for w in WEIGHTS],
    output:
        cka="results/cka/cka.json",
        plot=report("results/cka/cka.png", category="analyses"),
    params:
        preset=config["preset"],
        node=node_params("seed", "analyze", "dbot"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/logs/cka.log",
    benchmark:
        "results/benchmarks/cka.tsv"
    shell:
        "python -m pipeline.stages.cka --preset {params.preset} > {log} 2>&1"
