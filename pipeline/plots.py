"""Plots of the study, drawn with matplotlib's Agg canvas (no pyplot, no global backend state) and written
atomically as PNG files.

- pretrain_loss(docs, path): pre-training loss per epoch from the pre-training metrics.json dicts; the dBOT
  stages are drawn one after the other on one epoch axis, MAE (and any other single-stage method) from epoch 1.
- accuracy_vs_compute(table, flops, path): top-1 against the training FLOPs that produced each encoder, so
  methods compare at equal compute as well as at equal epochs.
- chain_accuracy(table, path): top-1 accuracy (k-NN and linear probe) vs dBOT stage from the long-format
  summary table of pipeline.report, with the single-stage methods and the random floor as labelled dashed
  horizontal lines.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.checkpoint import atomic_write

PANELS = (("knn", "k-NN top-1"), ("linprobe", "Linear-probe top-1"))
BASELINE_STYLE = {"mae": ("MAE", "tab:orange"), "sdae": ("SdAE", "tab:green"), "rcmae": ("RC-MAE", "tab:red"),
                  "bootmae": ("BootMAE", "tab:purple"), "supervised": ("supervised", "black"),
                  "random_init": ("random init (floor)", "tab:gray")}


def save_png(fig: Figure, path: Path | str, dpi: int = 120) -> None:
    """Write fig to path as a PNG, atomically (temp file in the same folder, then rename)."""
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))


def _label(doc: dict) -> str:
    return f"dBOT stage {doc['stage']}" if doc["method"] == "dbot" else str(doc["method"]).upper()


def pretrain_loss(docs: list[dict], path: Path | str) -> None:
    """Loss vs epoch, one line per pre-training node; dBOT stages consecutive (stage boundaries dotted)."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    chain = sorted((d for d in docs if d["method"] == "dbot"), key=lambda d: d["stage"])
    offset = 0
    for doc in chain:
        epochs = [offset + e["epoch"] + 1 for e in doc["epochs"]]
        ax.plot(epochs, [e["loss"] for e in doc["epochs"]], marker="o", ms=3, label=_label(doc))
        if offset:
            ax.axvline(offset + 0.5, color="0.7", ls=":", lw=1)
        offset += len(doc["epochs"])
    for doc in (d for d in docs if d["method"] != "dbot"):
        label, color = BASELINE_STYLE.get(doc["method"], (_label(doc), "black"))
        ax.plot([e["epoch"] + 1 for e in doc["epochs"]], [e["loss"] for e in doc["epochs"]],
                marker="s", ms=3, color=color, ls="--", label=label)
    ax.set_xlabel("epoch (dBOT stages run consecutively: stage k's teacher is stage k-1's student)")
    ax.set_ylabel("pre-training loss")
    ax.set_title("Pre-training loss (losses of different methods have different targets and scales)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)


def _top1_panels(table: pd.DataFrame, draw, xlabel: str, suptitle: str, path: Path | str) -> None:
    """Two panels (k-NN, linear probe) of top-1 (%): draw(ax, rows) plots one protocol's top-1 rows."""
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, len(PANELS), sharey=True)
    top1 = table[table["metric"] == "top1"]
    for ax, (protocol, title) in zip(axes, PANELS):
        draw(ax, top1[top1["protocol"] == protocol])
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("top-1 accuracy (%)")
    fig.suptitle(suptitle)
    save_png(fig, path)


def _chain(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["method"] == "dbot"].sort_values("stage")


def chain_accuracy(table: pd.DataFrame, path: Path | str) -> None:
    """Top-1 (%) vs dBOT stage, the other encoders as labelled dashed lines."""
    def draw(ax, rows):
        chain = _chain(rows)
        stages = [int(s) for s in chain["stage"]]
        ax.plot(stages, 100 * chain["value"].to_numpy(dtype=float), marker="o", color="tab:blue", label="dBOT")
        for weights, (label, color) in BASELINE_STYLE.items():
            for value in rows.loc[rows["weights"] == weights, "value"]:
                ax.axhline(100 * value, ls="--", color=color, label=f"{label}: {100 * value:.1f}%")
        ax.set_xticks(stages)

    _top1_panels(table, draw, "dBOT stage", "Accuracy along the dBOT chain", path)


def accuracy_vs_compute(table: pd.DataFrame, flops: dict[str, float], path: Path | str) -> None:
    """Top-1 (%) vs training PFLOPs; the dBOT chain joined by a line, the random floor dashed."""
    def draw(ax, rows):
        floor = rows.loc[rows["weights"] == "random_init", "value"]
        rows = rows[rows["weights"].isin(list(flops))]
        chain = _chain(rows)
        ax.plot([flops[w] / 1e15 for w in chain["weights"]], 100 * chain["value"].to_numpy(dtype=float),
                marker="o", color="tab:blue", label="dBOT (stage 0, 1, ...)")
        for _, row in rows[rows["method"] != "dbot"].iterrows():
            label, color = BASELINE_STYLE.get(row["weights"], (row["weights"], "black"))
            ax.scatter(flops[row["weights"]] / 1e15, 100 * float(row["value"]), color=color, marker="s", label=label)
        for value in floor:
            ax.axhline(100 * value, ls="--", color="tab:gray", label=f"random init (floor): {100 * value:.1f}%")

    _top1_panels(table, draw, "training compute (PFLOP, analytic)", "Accuracy against training compute", path)
