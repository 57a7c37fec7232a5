"""report: every metrics file of the study -> results/summary.csv (long format), summary.md, claims.csv, plots/*.png.

summary.md marks each of the papers' claims holds / does not hold / within the seed spread (pipeline.reporting.claims);
claims.csv holds the same comparisons for tools.

Plots: pre-training loss, online k-NN during pre-training, the kept encoders' accuracy along
training (checkpoint_eval), every protocol per encoder side by side, accuracy along the dBOT chains, the teacher-swap
study (accuracy per chain and
stage, spread across teachers), accuracy against compute, and the analyses of every encoder side by side
(mean attention distance per layer and head, singular-value share per layer).

Tiny run: python -m pipeline.stages.evaluation.report --preset tiny
"""
from pathlib import Path

from pipeline import dag, layout
from pipeline.errors import PipelineError
from pipeline.orchestration.cli import stage_main
from pipeline.orchestration.tracking import tracked


def inputs(params: dict) -> tuple[list, list, list, list]:
    """Its inputs in the node table (pipeline.dag): pre-training metrics and every tabulated evaluation's metrics
    of every seed; analyses and checkpoint evaluations of the first seed (drawn side by side)."""
    found = {k: [Path(p) for p in v] for k, v in dag.NODES["report"].inputs(params, {}).items()}
    return found["pretrain"], found["evaluations"], found["analyses"], found["curves"]


def check(params: dict, args) -> None:
    missing = [str(p) for group in inputs(params) for p in group if not p.is_file()]
    if missing:
        raise PipelineError(f"missing metrics files: {', '.join(missing)}; run the study first")


def work(params: dict, args) -> None:
    from pipeline.reporting.report import build_report

    pretrain, evals, analyses, curves = inputs(params)
    with tracked(params, "report", "report", layout.RESULTS, ["study", "seeds"]) as run:
        table = build_report(pretrain, evals, layout.RESULTS, analyses, params["dbot"]["chains"], curves)
        run.log_artifacts(layout.SUMMARY_CSV, layout.SUMMARY_MD, layout.CLAIMS_CSV,
                          *sorted(layout.PLOTS_DIR.glob("*.png")))
    print(f"report: {len(table)} rows -> {layout.SUMMARY_CSV}, {layout.SUMMARY_MD}, {layout.CLAIMS_CSV}, "
          f"{layout.PLOTS_DIR}/")


def main(argv=None) -> None:
    stage_main("report", __doc__, lambda p: None, check, work, lambda a: "report", argv, compute=False,
               per_seed=False)


if __name__ == "__main__":
    main()
