"""Evaluation of the encoders: knn, linprobe and segprobe (every encoder), finetune and robustness
(layout.finetune_weights), checkpoint_eval (the encoders kept during single-stage training). knn and linprobe
also run on the raw-pixel floor, {weights} = pixels (layout.probe_weights), which reads only the dataset.

Inputs: DATA (results/prepare_data/dataset.safetensors, or manifest.jsonl when streamed) and the weights file of {weights} (layout.weights_path);
robustness the fine-tuned model; checkpoint_eval layout.checkpoint_eval_inputs.
Outputs (per seed): results/seed<S>/<node>/<weights>/metrics.json (+ the node's plot).
"""



rule knn:
    input:
        data=DATA,
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
        "python -m pipeline.stages.evaluation.knn --preset {params.preset} --seed {wildcards.seed} --weights {wildcards.weights} > {log} 2>&1"


rule linprobe:
    input:
        data=DATA,
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
        "python -m pipeline.stages.evaluation.linprobe --preset {params.preset} --seed {wildcards.seed} --weights {wildcards.weights} > {log} 2>&1"


rule segprobe:
    input:
        data=DATA,
        weights=weights_file,
    output:
        metrics="results/seed{seed}/segprobe/{weights}/metrics.json",
        examples=report("results/seed{seed}/segprobe/{weights}/examples.png", category="segmentation probe",
                        subcategory="{weights}", labels={"node": "segprobe@seed{seed}-{weights}"}),
    params:
        preset=config["preset"],
        node=node_params("segprobe"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/seed{seed}/logs/segprobe/{weights}.log",
    benchmark:
        "results/seed{seed}/benchmarks/segprobe/{weights}.tsv"
    shell:
        "python -m pipeline.stages.evaluation.segprobe --preset {params.preset} --seed {wildcards.seed} --weights {wildcards.weights} > {log} 2>&1"


rule finetune:
    input:
        data=DATA,
        weights=weights_file,
    output:
        metrics="results/seed{seed}/finetune/{weights}/metrics.json",
        model="results/seed{seed}/finetune/{weights}/model.safetensors",
        meta="results/seed{seed}/finetune/{weights}/model.json",
        curve=report("results/seed{seed}/finetune/{weights}/curve.png", category="fine-tuning",
                     subcategory="{weights}", labels={"node": "finetune@seed{seed}-{weights}"}),
    params:
        preset=config["preset"],
        node=node_params("finetune"),
    threads: TRAIN_THREADS
    conda:
        "envs/pipeline.yaml"
    log:
        "results/seed{seed}/logs/finetune/{weights}.log",
    benchmark:
        "results/seed{seed}/benchmarks/finetune/{weights}.tsv"
    shell:
        "python -m pipeline.stages.evaluation.finetune --preset {params.preset} --seed {wildcards.seed} --weights {wildcards.weights} > {log} 2>&1"


rule robustness:
    input:
        data=DATA,
        model="results/seed{seed}/finetune/{weights}/model.safetensors",
    output:
        metrics="results/seed{seed}/robustness/{weights}/metrics.json",
        plot=report("results/seed{seed}/robustness/{weights}/robustness.png", category="robustness",
                    subcategory="{weights}", labels={"node": "robustness@seed{seed}-{weights}"}),
    params:
        preset=config["preset"],
        node=node_params("robustness"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/seed{seed}/logs/robustness/{weights}.log",
    benchmark:
        "results/seed{seed}/benchmarks/robustness/{weights}.tsv"
    shell:
        "python -m pipeline.stages.evaluation.robustness --preset {params.preset} --seed {wildcards.seed} --weights {wildcards.weights} > {log} 2>&1"


rule checkpoint_eval:
    input:
        checkpoint_eval_inputs,
    output:
        metrics="results/seed{seed}/checkpoint_eval/{weights}/metrics.json",
        curve=report("results/seed{seed}/checkpoint_eval/{weights}/curve.png", category="convergence",
                     subcategory="{weights}", labels={"node": "checkpoint_eval@seed{seed}-{weights}"}),
    params:
        preset=config["preset"],
        node=node_params("checkpoint_eval"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/seed{seed}/logs/checkpoint_eval/{weights}.log",
    benchmark:
        "results/seed{seed}/benchmarks/checkpoint_eval/{weights}.tsv"
    shell:
        "python -m pipeline.stages.evaluation.checkpoint_eval --preset {params.preset} --seed {wildcards.seed} --weights {wildcards.weights} > {log} 2>&1"
