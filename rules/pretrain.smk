"""Pre-training: pretrain (single-stage methods), supervised, teacher_swap and pretrain_dbot (the dBOT chains).

A dBOT node's key is <chain>_stage<k> (params dbot.chains x dbot.stages: the teacher-swap study).
Inputs: DATA (results/prepare_data/dataset.safetensors, or manifest.jsonl when streamed); dBOT node <key> also its teacher_swap output and, with
dbot.carry_optimizer_state, stage k-1's pretrain_dbot/<chain>_stage<k-1>/optimizer.pt.
Outputs (per seed, under results/seed<S>/): pretrain/<method>/, supervised/ and pretrain_dbot/<key>/:
encoder.{safetensors,json}, metrics.json (with the online k-NN curve), loss.csv and online_knn.csv (the curves as
data series), reconstruction.png (not supervised);
pretrain/<method>/ also checkpoints/epoch<k>.{safetensors,json} every
pretrain.keep_every_epochs; pretrain_dbot/<key>/optimizer.pt with dbot.carry_optimizer_state;
teacher_swap/<key>/teacher.{safetensors,json}.
Training nodes take half the cores: two small single-thread trainings side by side outrun one on two threads.
"""

TRAIN_THREADS = max(1, workflow.cores // 2)
CARRY = ["results/seed{seed}/pretrain_dbot/{key}/optimizer.pt"] if PARAMS["dbot"]["carry_optimizer_state"] else []



rule pretrain:
    input:
        data=DATA,
    output:
        weights="results/seed{seed}/pretrain/{method}/encoder.safetensors",
        meta="results/seed{seed}/pretrain/{method}/encoder.json",
        metrics="results/seed{seed}/pretrain/{method}/metrics.json",
        loss="results/seed{seed}/pretrain/{method}/loss.csv",                # the curves as data series (DVC plots)
        online_knn="results/seed{seed}/pretrain/{method}/online_knn.csv",
        picture=report("results/seed{seed}/pretrain/{method}/reconstruction.png", category="reconstructions",
                       subcategory="{method}", labels={"node": "pretrain@seed{seed}-{method}"}),
        kept=kept("mae", "results/seed{seed}/pretrain/{method}"),   # every single-stage method: pretrain.epochs
    params:
        preset=config["preset"],
        node=node_params("pretrain"),
    threads: TRAIN_THREADS
    conda:
        "envs/pipeline.yaml"
    log:
        "results/seed{seed}/logs/pretrain/{method}.log",
    benchmark:
        "results/seed{seed}/benchmarks/pretrain/{method}.tsv"
    shell:
        "python -m pipeline.stages.training.pretrain --preset {params.preset} --seed {wildcards.seed} --method {wildcards.method} > {log} 2>&1"


rule supervised:
    input:
        data=DATA,
    output:
        weights="results/seed{seed}/supervised/encoder.safetensors",
        meta="results/seed{seed}/supervised/encoder.json",
        metrics="results/seed{seed}/supervised/metrics.json",
        loss="results/seed{seed}/supervised/loss.csv",                # the curves as data series (DVC plots)
        online_knn="results/seed{seed}/supervised/online_knn.csv",
    params:
        preset=config["preset"],
        node=node_params("supervised"),
    threads: TRAIN_THREADS
    conda:
        "envs/pipeline.yaml"
    log:
        "results/seed{seed}/logs/supervised.log",
    benchmark:
        "results/seed{seed}/benchmarks/supervised.tsv"
    shell:
        "python -m pipeline.stages.training.supervised --preset {params.preset} --seed {wildcards.seed} > {log} 2>&1"


rule teacher_swap:
    input:
        source=teacher_source,
    output:
        weights="results/seed{seed}/teacher_swap/{key}/teacher.safetensors",
        meta="results/seed{seed}/teacher_swap/{key}/teacher.json",
    params:
        preset=config["preset"],
        node=node_params("teacher_swap"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/seed{seed}/logs/teacher_swap/{key}.log",
    benchmark:
        "results/seed{seed}/benchmarks/teacher_swap/{key}.tsv"
    shell:
        "python -m pipeline.stages.training.teacher_swap --preset {params.preset} --seed {wildcards.seed} --stage {wildcards.key} > {log} 2>&1"


rule pretrain_dbot:
    input:
        data=DATA,
        teacher="results/seed{seed}/teacher_swap/{key}/teacher.safetensors",
        optimizer=carried_optimizer,
    output:
        weights="results/seed{seed}/pretrain_dbot/{key}/encoder.safetensors",
        meta="results/seed{seed}/pretrain_dbot/{key}/encoder.json",
        metrics="results/seed{seed}/pretrain_dbot/{key}/metrics.json",
        loss="results/seed{seed}/pretrain_dbot/{key}/loss.csv",                # the curves as data series (DVC plots)
        online_knn="results/seed{seed}/pretrain_dbot/{key}/online_knn.csv",
        picture=report("results/seed{seed}/pretrain_dbot/{key}/reconstruction.png", category="reconstructions",
                       subcategory="dbot {key}", labels={"node": "pretrain_dbot@seed{seed}-{key}"}),
        optimizer=CARRY,
    params:
        preset=config["preset"],
        node=node_params("pretrain_dbot"),
    threads: TRAIN_THREADS
    conda:
        "envs/pipeline.yaml"
    log:
        "results/seed{seed}/logs/pretrain_dbot/{key}.log",
    benchmark:
        "results/seed{seed}/benchmarks/pretrain_dbot/{key}.tsv"
    shell:
        "python -m pipeline.stages.training.pretrain_dbot --preset {params.preset} --seed {wildcards.seed} --stage {wildcards.key} > {log} 2>&1"
