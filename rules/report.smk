"""report: every metrics file of the study, across seeds -> results/summary.{csv,md} and results/plots/*.png.

Inputs (every seed S): results/seed<S>/{pretrain,supervised,pretrain_dbot}/**/metrics.json,
results/seed<S>/{knn,linprobe}/<weights>/metrics.json, results/seed<S>/cka/cka.json; the first seed's analyses.
Outputs: results/summary.{csv,md}, results/swap_study.csv, results/swap_spread.csv, results/plots/*.png.
"""


rule report:
    input:
        pretrain=[str(p) for s in SEEDS for p in layout.pretrain_metrics(PARAMS, s)],
        knn=expand("results/seed{seed}/knn/{weights}/metrics.json", seed=SEEDS, weights=WEIGHTS),
        linprobe=expand("results/seed{seed}/linprobe/{weights}/metrics.json", seed=SEEDS, weights=WEIGHTS),
        analyze=expand("results/seed{seed}/analyze/{weights}/analysis.json", seed=SEEDS[:1], weights=WEIGHTS),
        cka=expand("results/seed{seed}/cka/cka.json", seed=SEEDS),
    output:
        csv="results/summary.csv",
        md="results/summary.md",
        loss=report("results/plots/pretrain_loss.png", category="pre-training"),
        chain=report("results/plots/chain_accuracy.png", category="evaluation"),
        compute=report("results/plots/accuracy_vs_compute.png", category="evaluation"),
        distance=report("results/plots/attention_distance.png", category="analyses"),
        singular=report("results/plots/singular_value_share.png", category="analyses"),
        swap=report("results/plots/swap_study.png", category="evaluation"),
        swap_csv="results/swap_study.csv",
        spread_csv="results/swap_spread.csv",
    params:
        preset=config["preset"],
        node=node_params("seeds", "dbot.chains"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    shell:
        "python -m pipeline.stages.report --preset {params.preset} > {log} 2>&1"
