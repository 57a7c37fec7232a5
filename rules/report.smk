"""report: every metrics file of the study -> results/summary.{csv,md} and results/plots/*.png.

Inputs: results/pretrain*/**/metrics.json, results/{knn,linprobe}/<weights>/metrics.json.
Outputs: results/summary.{csv,md}, results/swap_study.csv, results/swap_spread.csv, results/plots/*.png.
"""


rule report:
    input:
        pretrain=[str(p) for p in layout.pretrain_metrics(PARAMS)],
        knn=expand("results/knn/{weights}/metrics.json", weights=WEIGHTS),
        linprobe=expand("results/linprobe/{weights}/metrics.json", weights=WEIGHTS),
        analyze=expand("results/analyze/{weights}/analysis.json", weights=WEIGHTS),
        cka="results/cka/cka.json",
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
        node=node_params("dbot.chains"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    shell:
        "python -m pipeline.stages.report --preset {params.preset} > {log} 2>&1"
