"""The study's comparison: every metrics.json -> a long-format table, summary.csv, summary.md and plots.

- summary.csv: one row per (seed, weights, protocol, metric); columns seed, method, stage, weights,
  evaluated, protocol, metric, value, settings. Evaluation rows (protocol knn/linprobe, metric top1/top5/...) hold
  fractions in [0, 1];
  pre-training rows (protocol "pretrain") hold final_loss, wall_s, images_seen, train_flops and, where the node
  logged an online k-NN, early_online_knn_top1 (its mean over the first half of the epochs). stage is empty for
  the floors (random_init, and pixels: knn and linprobe on the normalised raw pixels); settings is the
  protocol settings as compact JSON (empty for pre-training rows).
- summary.md: one row per encoder (the floors, single-stage methods, dBOT chains stage by stage) with top-1
  percentages (mean ± std over seeds), final pre-training loss and wall time, under a paragraph naming the
  evaluation settings; then the papers' claims marked holds / does not hold / within the seed spread
  (pipeline.reporting.claims, also written as claims.csv); then the comparisons marked against the seed spread
  (pipeline.reporting.seed_stats); then the teacher-swap study (pipeline.reporting.swap_study), also written as
  swap_study.csv (per chain) and swap_spread.csv (spread across teachers per stage).
- plots/*.png (see pipeline.plots).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import torch

from pipeline import plots
from pipeline.checkpoint import atomic_write, read_json
from pipeline.errors import PipelineError
from pipeline.layout import FLOORS, SINGLE_STAGE_METHODS, parse_dbot_key
from pipeline.reporting import claims, seed_stats, swap_study
from pipeline.reporting.tables import markdown_table

COLUMNS = ["seed", "method", "stage", "weights", "evaluated", "protocol", "metric", "value", "settings"]
PRETRAIN_METRICS = (("final_loss", "loss"), ("wall_s", "wall_s"), ("images_seen", "images_seen"),
                    ("train_flops", "train_flops"))
EARLY_KNN = claims.EARLY_KNN   # pre-training row: mean online k-NN top-1 over the first half of the epochs
PROTOCOL_ORDER = {"pretrain": 0, "knn": 1, "linprobe": 2, "finetune": 3, "segprobe": 4, "robustness": 5}
PROTOCOL_NAMES = {"knn": "k-NN", "linprobe": "linear probe", "finetune": "fine-tune", "segprobe": "segmentation probe",
                  "robustness": "robustness"}
EVAL_COLUMNS = (("knn", "top1", "k-NN top-1 (%)"), ("linprobe", "top1", "linear top-1 (%)"),   # summary.md, in %
                ("finetune", "top1", "fine-tune top-1 (%)"), ("segprobe", "miou", "seg. mIoU (%)"),
                ("robustness", "mean_corrupted_top1", "corrupted top-1 (%)"))
MISSING = "—"


def _require(doc: dict, path: Path, *keys: str) -> None:
    """Raise a PipelineError naming path when doc lacks one of keys."""
    absent = [k for k in keys if not isinstance(doc, dict) or k not in doc]
    if absent:
        raise PipelineError(f"{path} is not a metrics file of this pipeline: missing key(s) {', '.join(absent)}")


def _number(value, path: Path, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PipelineError(f"{path}: {what} is not a number ({value!r})") from None


def early_online_knn(epochs: list[dict], path: Path) -> float | None:
    """Mean online k-NN top-1 (epochs[*].online_knn_top1) over the epochs of the first half of training
    (epoch index < ceil(E / 2) of E epochs), or None where none of them has one."""
    half = math.ceil(len(epochs) / 2)
    early = [_number(e["online_knn_top1"], path, "online_knn_top1") for e in epochs
             if "online_knn_top1" in e and e["epoch"] < half]
    return sum(early) / len(early) if early else None


def pretrain_rows(doc: dict, path: Path) -> list[dict]:
    """The pre-training rows (final_loss, wall_s, images_seen, train_flops, and early_online_knn_top1 where the
    node logged an online k-NN) of one pre-training metrics.json."""
    _require(doc, path, "seed", "method", "stage", "weights", "epochs", "final")
    _require(doc["final"], path, *(key for _, key in PRETRAIN_METRICS))
    for epoch in doc["epochs"]:
        _require(epoch, path, "epoch", "loss")
    base = {"seed": doc["seed"], "method": doc["method"], "stage": doc["stage"], "weights": doc["weights"],
            "protocol": "pretrain", "evaluated": "", "settings": ""}
    rows = [dict(base, metric=name, value=_number(doc["final"][key], path, f"final.{key}"))
            for name, key in PRETRAIN_METRICS]
    early = early_online_knn(doc["epochs"], path)
    return rows + ([dict(base, metric=EARLY_KNN, value=early)] if early is not None else [])


def eval_rows(doc: dict, path: Path) -> list[dict]:
    """One row per metric of one evaluation metrics.json (knn or linprobe)."""
    _require(doc, path, "protocol", "settings", "weights", "metrics")
    _require(doc["weights"], path, "id", "method", "stage", "seed")
    if not isinstance(doc["settings"], dict) or not isinstance(doc["metrics"], dict):
        raise PipelineError(f"{path}: settings and metrics must be JSON objects")
    w, settings = doc["weights"], json.dumps(doc["settings"], sort_keys=True, separators=(",", ":"))
    base = {"seed": w["seed"], "method": w["method"], "stage": w["stage"], "weights": w["id"],
            "protocol": doc["protocol"]}
    return [dict(base, evaluated=w.get("evaluated", ""), metric=m, value=_number(v, path, f"metrics.{m}"),
                 settings=settings)
            for m, v in doc["metrics"].items()]


def weights_key(weights: str) -> tuple:
    """Sort key of a weights id: the floors (random_init, pixels), single-stage methods, dBOT chains (the
    random-teacher chain first, then by name) with stages ascending, then the rest."""
    if weights in FLOORS:
        return (0, FLOORS.index(weights), "")
    if weights in SINGLE_STAGE_METHODS:
        return (1, SINGLE_STAGE_METHODS.index(weights), "")
    if weights.startswith("dbot_"):
        try:
            chain, stage = parse_dbot_key(weights.removeprefix("dbot_"))
        except ValueError:
            return (3, 0, weights)
        return (2, f"{chain != 'random':d}{chain}", stage)
    return (3, 0, weights)


def long_table(pretrain_docs: list[tuple[Path, dict]], eval_docs: list[tuple[Path, dict]]) -> pd.DataFrame:
    """The long-format table of all rows, sorted by weights, protocol, metric, seed; duplicates are an error."""
    rows = [r for p, d in pretrain_docs for r in pretrain_rows(d, p)]
    rows += [r for p, d in eval_docs for r in eval_rows(d, p)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    dup = table[table.duplicated(["seed", "weights", "protocol", "metric"], keep=False)]
    if not dup.empty:
        first = dup.iloc[0]
        raise PipelineError(f"two metrics files give {first.protocol}/{first.metric} of {first.weights} "
                            f"(seed {first.seed})")
    table["stage"] = pd.array([None if pd.isna(s) else int(s) for s in table["stage"]], dtype="Int64")
    table["value"] = table["value"].astype(float)
    order = table.assign(_w=table["weights"].map(weights_key),
                         _p=table["protocol"].map(lambda p: PROTOCOL_ORDER.get(p, 9)))
    return table.loc[order.sort_values(["_w", "_p", "protocol", "metric", "seed"]).index].reset_index(drop=True)


def _value(table: pd.DataFrame, weights: str, protocol: str, metric: str, column: str = "value") -> float | None:
    hit = table.loc[(table.weights == weights) & (table.protocol == protocol) & (table.metric == metric), column]
    return None if hit.empty else float(hit.iloc[0])


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return MISSING if value is None else format(scale * value, spec)


def chain_flops(table: pd.DataFrame, chains: dict[str, str] | None = None) -> dict[str, float]:
    """weights id -> training FLOPs that produced it: its own node's, plus every earlier stage's of its dBOT
    chain, plus the training of the chain's stage-0 teacher where the study trained it (chains: dbot.chains)."""
    rows = table[(table.protocol == "pretrain") & (table.metric == "train_flops")]
    own = dict(zip(rows.weights, rows.value.astype(float)))
    stages = sorted((parse_dbot_key(w.removeprefix("dbot_")), v) for w, v in own.items() if w.startswith("dbot_"))
    totals = {}
    for (chain, k), value in stages:
        start = own.get((chains or {}).get(chain), 0.0)
        totals[chain] = totals.get(chain, start) + value
        own[f"dbot_{chain}_stage{k}"] = totals[chain]
    return own


def summary_rows(table: pd.DataFrame, chains: dict[str, str] | None = None) -> list[list[str]]:
    """One formatted markdown row per weights id, in weights_key order, from the seed-mean table."""
    flops, rows = chain_flops(table, chains), []
    for weights in sorted(table["weights"].unique(), key=weights_key):
        first = table[table.weights == weights].iloc[0]
        stage = "" if pd.isna(first.stage) else str(int(first.stage))
        evaluated = table.loc[(table.weights == weights) & (table.evaluated != ""), "evaluated"]
        rows.append([weights, str(first.method), stage, evaluated.iloc[0] if len(evaluated) else "",
                     str(int(table.loc[table.weights == weights, "seeds"].max()))]
                    + [seed_stats.fmt_mean(_value(table, weights, protocol, metric),
                                           _value(table, weights, protocol, metric, "std"))
                       for protocol, metric, _ in EVAL_COLUMNS]
                    + [_fmt(_value(table, weights, "pretrain", "final_loss"), ".4f"),
                     _fmt(_value(table, weights, "pretrain", "wall_s"), ".1f"),
                     _fmt(flops.get(weights), ".1f", 1e-12)])
    return rows


def settings_sentence(table: pd.DataFrame) -> str:
    """'k-NN: k=20, ...; linear probe: ...' from the settings column (all variants listed when they differ)."""
    parts = []
    for protocol in sorted(set(table.protocol) - {"pretrain"}, key=lambda p: (PROTOCOL_ORDER.get(p, 9), p)):
        variants = sorted(set(table.loc[table.protocol == protocol, "settings"]))
        text = " | ".join(", ".join(f"{k}={v}" for k, v in json.loads(s).items()) for s in variants)
        note = " (differs between encoders)" if len(variants) > 1 else ""
        parts.append(f"{PROTOCOL_NAMES.get(protocol, protocol)}: {text}{note}")
    return "; ".join(parts) if parts else "none"


def markdown(table: pd.DataFrame, chains: dict[str, str] | None = None) -> str:
    """summary.md from the seed-mean table: a header paragraph, one table row per encoder, the claims, the
    comparisons against the seed spread, and the teacher-swap study."""
    header = (["weights", "method", "stage", "evaluated", "seeds"] + [name for _, _, name in EVAL_COLUMNS]
              + ["final pre-train loss", "pre-train wall (s)", "train compute (TFLOP)"])
    intro = ("# Study summary\n\n"
             "Accuracy on the validation split of every encoder of the study (mean over the study's seeds, ± "
             "their sample standard deviation when there are several): k-NN, linear probe and segmentation probe "
             "(mean IoU of a linear head on the patch tokens) on the frozen encoder; fine-tune and corrupted "
             "top-1 (the fine-tuned model on noisy, blurred and low-contrast images, mean over corruptions and "
             "severities) for the encoders finetune.weights selects (— for the others). The floors are the "
             "random-init encoder and pixels (k-NN and linear probe with the same settings on the normalised raw "
             "pixels, flattened: what an encoder must add to the image itself); mae, sdae, rcmae and bootmae are "
             "single-stage methods (for the "
             "methods with an EMA teacher, `evaluated` says whether the student or the teacher was evaluated, as "
             "their evaluate_weights param says); "
             "supervised is the same ViT trained with labels; dbot_<chain>_stage<k> is the student of stage k of the "
             "dBOT chain <chain> (stage 0's teacher is the chain's teacher, stage k's the student of stage k-1). "
             "Final pre-train loss is the mean loss of "
             "the last pre-training epoch (methods regress different targets, so losses compare only within a "
             f"method); wall time is the summed epoch time of the node; train compute is the analytic FLOPs of "
             "training (pipeline.models.flops), summed along a dBOT chain up to that stage, with the training of its "
             "stage-0 teacher when the study made it. Evaluation settings: "
             f"{settings_sentence(table)}. Generated from the metrics.json files by pipeline.reporting.report; the "
             "long format with all metrics is summary.csv.\n\n")
    lines = markdown_table(header, summary_rows(table, chains), "llrlr")
    compared = seed_stats.markdown(table, chains or {}, dbot_stages(table))
    swap = swap_study.markdown(swap_study.chain_rows(table, chains), chains) if chains else ""
    seeds = int(table["seeds"].max()) if len(table) else 0
    return intro + "\n".join(lines) + "\n" + claims.markdown(claims_table(table, chains), seeds) + compared + swap


def dbot_stages(table: pd.DataFrame) -> list[int]:
    return sorted(int(s) for s in table.loc[table.method == "dbot", "stage"].dropna().unique())


def claims_table(table: pd.DataFrame, chains: dict[str, str] | None = None) -> pd.DataFrame:
    """The claims' comparisons (pipeline.reporting.claims) from the seed-mean table: what claims.csv holds."""
    spread = swap_study.spread(swap_study.chain_rows(table, chains or {}))
    return claims.check(table, chains or {}, dbot_stages(table), spread)


def _read_all(files: list[Path]) -> list[tuple[Path, dict]]:
    """(path, parsed JSON) for each file; a missing or unreadable file is a PipelineError naming it."""
    return [(Path(f), read_json(f)) for f in files]


def _analysis_plots(docs: list[dict], plots_dir: Path) -> None:
    """Attention distance and singular-value share of every analysed encoder, side by side."""
    from pipeline.evaluation import representations  # late: pulls in the model code, which the tables alone do not need

    docs = sorted(docs, key=lambda d: weights_key(d["weights"]["id"]))
    representations.plot_attention_distance({d["weights"]["id"]: torch.tensor(d["attention_distance"]) for d in docs},
                                     plots_dir / "attention_distance.png")
    representations.plot_singular_value_share({d["weights"]["id"]: torch.tensor(d["singular_value_share"])
                                               for d in docs},
                                       plots_dir / "singular_value_share.png")


def build_report(pretrain_files: list[Path], eval_files: list[Path], out_dir: Path = Path("results"),
                 analysis_files: list[Path] = (), chains: dict[str, str] | None = None,
                 curve_files: list[Path] = ()) -> pd.DataFrame:
    """Read all metrics files (every seed), write out_dir/summary.csv (per seed), summary.md, swap_study.csv,
    swap_spread.csv, claims.csv and plots/*.png (means over seeds; the loss curves of the first seed); return the long
    table. chains: params dbot.chains (chain -> stage-0 teacher), for the teacher-swap study; curve_files:
    checkpoint_eval metrics (accuracy of the encoders kept along training), drawn in one plot.

    Every input is read and checked before anything is written.
    """
    pretrain_docs, eval_docs, analysis_docs = (_read_all(pretrain_files), _read_all(eval_files),
                                               _read_all(analysis_files))
    curve_docs = _read_all(curve_files)
    table = long_table(pretrain_docs, eval_docs)
    mean = seed_stats.seed_mean(table)
    out_dir = Path(out_dir)
    atomic_write(out_dir / "summary.csv", lambda p: table.to_csv(p, index=False))
    atomic_write(out_dir / "summary.md", lambda p: p.write_text(markdown(mean, chains)))
    swap_rows = swap_study.chain_rows(mean, chains or {})
    atomic_write(out_dir / "swap_study.csv", lambda p: swap_rows.to_csv(p, index=False))
    atomic_write(out_dir / "swap_spread.csv", lambda p: swap_study.spread(swap_rows).to_csv(p, index=False))
    atomic_write(out_dir / "claims.csv", lambda p: claims_table(mean, chains).to_csv(p, index=False))
    first_seed = min(d["seed"] for _, d in pretrain_docs) if pretrain_docs else None
    first_docs = [d for _, d in pretrain_docs if d["seed"] == first_seed]
    plots.pretrain_loss(first_docs, out_dir / "plots" / "pretrain_loss.png")
    plots.online_knn(first_docs, out_dir / "plots" / "online_knn.png")
    plots.protocols(mean, [(p, m, name) for p, m, name in EVAL_COLUMNS], out_dir / "plots" / "protocols.png")
    if curve_docs:
        plots.checkpoint_curves([d for _, d in curve_docs], out_dir / "plots" / "checkpoint_eval.png")
    plots.chain_accuracy(mean, out_dir / "plots" / "chain_accuracy.png")
    plots.accuracy_vs_compute(mean, chain_flops(mean, chains), out_dir / "plots" / "accuracy_vs_compute.png")
    if not swap_rows.empty:
        plots.swap_study(swap_rows, swap_study.spread(swap_rows), out_dir / "plots" / "swap_study.png")
    if analysis_docs:
        _analysis_plots([d for _, d in analysis_docs], out_dir / "plots")
    return table
