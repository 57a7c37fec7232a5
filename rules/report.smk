"""report: every metrics file of the study, across seeds -> results/summary.{csv,md} and results/plots/*.png.

Inputs (every seed S): results/seed<S>/{pretrain,supervised,pretrain_dbot}/**/metrics.json, every evaluation's
metrics.json (layout.evaluation_metrics), results/seed<S>/cka/cka.json; the first seed's analyses and
checkpoint evaluations (on a streamed dataset none of layout.IN_MEMORY_NODES). Outputs: results/summary.{csv,md}, results/swap_study.csv, results/swap_spread.csv,
results/claims.csv, results/plots/*.png. `snakemake --report report.html` collects every output marked report() in rules/.
"""

CURVES = [str(layout.eval_metrics("checkpoint_eval", w, SEEDS[0])) for w in layout.checkpoint_eval_weights(PARAMS)]


rule report:
    input:
        pretrain=[str(p) for s in SEEDS for p in layout.pretrain_metrics(PARAMS, s)],
        evaluations=[str(p) for s in SEEDS for p in layout.evaluation_metrics(PARAMS, s)],
        curves=CURVES,
        analyze=[str(layout.analysis_path(w, SEEDS[0])) for w in layout.analysis_weights(PARAMS)],
        cka=[str(layout.cka_path(s)) for s in layout.cka_seeds(PARAMS)],
    output:
        csv="results/summary.csv",
        md="results/summary.md",
        loss=report("results/plots/pretrain_loss.png", category="pre-training"),
        online=report("results/plots/online_knn.png", category="pre-training"),
        protocols=report("results/plots/protocols.png", category="evaluation"),
        chain=report("results/plots/chain_accuracy.png", category="evaluation"),
        compute=report("results/plots/accuracy_vs_compute.png", category="evaluation"),
        analyses=[report(f"results/plots/{name}.png", category="analyses") for name in layout.report_plots(PARAMS)
                  if name in ("attention_distance", "singular_value_share")],
        swap=report("results/plots/swap_study.png", category="evaluation"),
        swap_csv="results/swap_study.csv",
        spread_csv="results/swap_spread.csv",
        claims_csv="results/claims.csv",
        curve_plot=[report("results/plots/checkpoint_eval.png", category="convergence")] if CURVES else [],
    params:
        preset=config["preset"],
        node=node_params("report"),
    conda:
        "envs/pipeline.yaml"
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    shell:
        "python -m pipeline.stages.evaluation.report --preset {params.preset} > {log} 2>&1"
