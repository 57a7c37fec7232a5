"""Plots of the study, drawn with matplotlib's Agg canvas (no pyplot, no global backend state) and written
atomically as PNG files.

- pretrain_loss(docs, path): pre-training loss per epoch from the pre-training metrics.json dicts; each dBOT
  chain's stages are drawn one after the other on one epoch axis, single-stage methods from epoch 1.
- online_knn(docs, path): the online k-NN top-1 logged during pre-training, laid out as pretrain_loss.
- checkpoint_curve(weights, rows, online, path): checkpoint_eval's top-1 of the kept encoders vs epoch.
- checkpoint_curves(docs, path): every checkpoint_eval's curves in one figure.
- protocols(table, columns, path): every protocol per encoder side by side (bars, seed std as error bars).
- accuracy_vs_compute(table, flops, path): top-1 against the training FLOPs that produced each encoder, so
  methods compare at equal compute as well as at equal epochs.
- chain_accuracy(table, path): top-1 accuracy (k-NN and linear probe) vs dBOT stage, one line per chain, from
  the long-format summary table of pipeline.reporting.report, with the single-stage methods and the floors (random
  init dashed, raw pixels dotted) as labelled horizontal lines.
- swap_study(rows, spread, path): the teacher-swap study: top-1 per chain and stage (from the teacher on), and
  the spread across teachers per stage.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline import methods
from pipeline.checkpoint import atomic_write
from pipeline.layout import parse_dbot_key

PANELS = (("knn", "k-NN top-1"), ("linprobe", "Linear-probe top-1"))
BASELINE_STYLE = {**{m: (methods.spec(m)["label"], methods.spec(m)["color"]) for m in methods.NAMES  # SPEC's style
                     if m not in methods.with_node("pretrain_dbot")},
                  "random_init": ("random init (floor)", "tab:gray"), "pixels": ("raw pixels (floor)", "darkgoldenrod")}
FLOOR_LINES = {"random_init": "--", "pixels": ":"}   # the two floors: random-init encoder, normalised raw pixels
CHAIN_COLORS = ("tab:blue", "tab:cyan", "tab:olive", "tab:brown", "tab:pink", "navy")


def save_png(fig: Figure, path: Path | str, dpi: int = 120) -> None:
    """Write fig to path as a PNG, atomically (temp file in the same folder, then rename)."""
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))


def _chain_name(weights: str) -> str:
    """dbot_<chain>_stage<k> -> <chain>."""
    return parse_dbot_key(weights.removeprefix("dbot_"))[0]


def _chains(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The dBOT rows of a table, per chain (in order of appearance), stages ascending."""
    dbot = rows[rows["method"] == "dbot"]
    names = list(dict.fromkeys(_chain_name(w) for w in dbot["weights"]))
    return {c: dbot[dbot["weights"].map(_chain_name) == c].sort_values("stage") for c in names}


TRAINING_CURVES = {   # metric of the training nodes' per-epoch history -> (y label, title)
    "loss": ("pre-training loss", "Pre-training loss (losses of different methods have different targets and scales)"),
    "online_knn_top1": ("online k-NN top-1 (subset)", "Convergence: k-NN top-1 on a fixed subset during pre-training"),
}


def pretrain_loss(docs: list[dict], path: Path | str) -> None:
    """Loss vs epoch, one line per pre-training node; each dBOT chain's stages consecutive (boundaries dotted)."""
    training_curve(docs, "loss", path)


def online_knn(docs: list[dict], path: Path | str) -> None:
    """Online k-NN top-1 vs epoch (pretrain.online_knn), laid out as pretrain_loss."""
    training_curve(docs, "online_knn_top1", path)


def training_curve(docs: list[dict], key: str, path: Path | str) -> None:
    """One per-epoch metric of the training nodes vs epoch: each dBOT chain's stages one after the other
    (stage boundaries dotted), single-stage methods and supervised from epoch 1 (dashed)."""
    ylabel, title = TRAINING_CURVES[key]
    scale = 100 if key.endswith("top1") else 1

    def points(doc, offset=0):
        rows = [e for e in doc["epochs"] if key in e]
        return [offset + e["epoch"] + 1 for e in rows], [scale * e[key] for e in rows]

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    dbot = [d for d in docs if d["method"] == "dbot"]
    boundaries = set()
    for i, chain in enumerate(dict.fromkeys(_chain_name(d["weights"]) for d in dbot)):
        offset, color = 0, CHAIN_COLORS[i % len(CHAIN_COLORS)]
        for doc in sorted((d for d in dbot if _chain_name(d["weights"]) == chain), key=lambda d: d["stage"]):
            ax.plot(*points(doc, offset), marker="o", ms=3, color=color,
                    label=f"dBOT chain {chain}" if offset == 0 else None)
            if offset:
                boundaries.add(offset + 0.5)
            offset += len(doc["epochs"])
    for x in boundaries:
        ax.axvline(x, color="0.7", ls=":", lw=1)
    for doc in (d for d in docs if d["method"] != "dbot"):
        label, color = BASELINE_STYLE.get(doc["method"], (str(doc["method"]).upper(), "black"))
        ax.plot(*points(doc), marker="s", ms=3, color=color, ls="--", label=label)
    ax.set_xlabel("epoch (dBOT stages run consecutively: stage k's teacher is stage k-1's student)")
    ax.set_ylabel(ylabel + (" (%)" if scale == 100 else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)


def checkpoint_curve(weights: str, rows: list[dict], online: list[dict], path: Path | str) -> None:
    """checkpoint_eval: k-NN and linear-probe top-1 of the kept encoders vs epoch, with the online k-NN."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for (name, label), marker in zip(PANELS, "os"):
        ax.plot([r["epoch"] for r in rows], [100 * r[f"{name}_top1"] for r in rows], marker=marker, label=label)
    if online:
        ax.plot([o["epoch"] for o in online], [100 * o["online_knn_top1"] for o in online], ls=":", color="0.4",
                label="online k-NN (subset)")
    ax.set_xlabel("pre-training epoch")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{BASELINE_STYLE.get(weights, (weights,))[0]}: accuracy of the kept encoders")
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


def chain_accuracy(table: pd.DataFrame, path: Path | str) -> None:
    """Top-1 (%) vs dBOT stage, one line per chain, the other encoders as labelled dashed lines."""
    def draw(ax, rows):
        stages = set()
        for i, (name, chain) in enumerate(_chains(rows).items()):
            stages |= {int(s) for s in chain["stage"]}
            ax.plot([int(s) for s in chain["stage"]], 100 * chain["value"].to_numpy(dtype=float), marker="o",
                    color=CHAIN_COLORS[i % len(CHAIN_COLORS)], label=f"dBOT chain {name}")
        for weights, (label, color) in BASELINE_STYLE.items():
            for value in rows.loc[rows["weights"] == weights, "value"]:
                ax.axhline(100 * value, ls=FLOOR_LINES.get(weights, "--"), color=color,
                           label=f"{label}: {100 * value:.1f}%")
        ax.set_xticks(sorted(stages))

    _top1_panels(table, draw, "dBOT stage", "Accuracy along the dBOT chain", path)


def checkpoint_curves(docs: list[dict], path: Path | str) -> None:
    """Every checkpoint_eval in one figure: k-NN and linear-probe top-1 of the kept encoders vs epoch."""
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, len(PANELS), squeeze=False)[0]
    for ax, (name, label) in zip(axes, PANELS):
        for doc in docs:
            weights = doc["weights"]["id"]
            text, color = BASELINE_STYLE.get(weights, (weights, None))
            ax.plot([r["epoch"] for r in doc["epochs"]], [100 * r[f"{name}_top1"] for r in doc["epochs"]],
                    marker="o", ms=3, color=color, label=text)
        ax.set_xlabel("pre-training epoch")
        ax.set_ylabel(f"{label} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Accuracy of the encoders kept during training (checkpoint_eval)")
    save_png(fig, path)


def protocols(table: pd.DataFrame, columns: list[tuple[str, str, str]], path: Path | str) -> None:
    """Every evaluation protocol side by side: one panel per (protocol, metric, label), a bar per encoder
    (mean over seeds, the seed std as an error bar), in the table's order."""
    order = list(dict.fromkeys(table["weights"]))
    fig = Figure(figsize=(3.2 * len(columns), 0.3 * len(order) + 1.5))
    axes = fig.subplots(1, len(columns), squeeze=False, sharey=True)[0]
    for ax, (protocol, metric, label) in zip(axes, columns):
        rows = table[(table.protocol == protocol) & (table.metric == metric)].set_index("weights")
        values = [100 * rows.value.get(w, float("nan")) for w in order]
        errors = [100 * rows["std"].get(w, 0.0) if "std" in rows else 0.0 for w in order]
        colors = [BASELINE_STYLE.get(w, ("", "tab:blue"))[1] for w in order]
        ax.barh(range(len(order)), values, xerr=[0 if pd.isna(e) else e for e in errors], color=colors, alpha=0.8)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(order)), order, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Every protocol per encoder (empty: not evaluated by that protocol)")
    save_png(fig, path)


def accuracy_vs_compute(table: pd.DataFrame, flops: dict[str, float], path: Path | str) -> None:
    """Top-1 (%) vs training PFLOPs; the dBOT chain joined by a line, the floors as horizontal lines (random
    init dashed, raw pixels dotted)."""
    def draw(ax, rows):
        floors = [(w, v) for w in FLOOR_LINES for v in rows.loc[rows["weights"] == w, "value"]]
        rows = rows[rows["weights"].isin(list(flops))]
        for i, (name, chain) in enumerate(_chains(rows).items()):
            ax.plot([flops[w] / 1e15 for w in chain["weights"]], 100 * chain["value"].to_numpy(dtype=float),
                    marker="o", color=CHAIN_COLORS[i % len(CHAIN_COLORS)], label=f"dBOT chain {name} (stage 0, 1, ...)")
        for _, row in rows[rows["method"] != "dbot"].iterrows():
            label, color = BASELINE_STYLE.get(row["weights"], (row["weights"], "black"))
            ax.scatter(flops[row["weights"]] / 1e15, 100 * float(row["value"]), color=color, marker="s", label=label)
        for weights, value in floors:
            label, color = BASELINE_STYLE[weights]
            ax.axhline(100 * value, ls=FLOOR_LINES[weights], color=color, label=f"{label}: {100 * value:.1f}%")

    _top1_panels(table, draw, "training compute (PFLOP, analytic)", "Accuracy against training compute", path)


def stage_order(stage: str) -> int:
    """The swap study's x order: a chain's teacher, then its stages 0, 1, ..."""
    return -1 if stage == "teacher" else int(stage)


def swap_study(rows: pd.DataFrame, spread: pd.DataFrame, path: Path | str) -> None:
    """Top: top-1 (%) per chain from its teacher through the stages (k-NN, linear). Bottom: the spread across
    teachers per stage (sample std and max - min, points)."""
    stages = sorted(rows["stage"].unique(), key=stage_order)
    xs = {s: i for i, s in enumerate(stages)}
    fig = Figure(figsize=(10, 7))
    axes = fig.subplots(2, len(PANELS), sharex=True)
    for col, (protocol, title) in enumerate(PANELS):
        ax = axes[0][col]
        own = rows[rows["protocol"] == protocol]
        for i, chain in enumerate(dict.fromkeys(own["chain"])):
            r = own[own["chain"] == chain].sort_values("stage", key=lambda s: s.map(stage_order))
            ax.plot([xs[s] for s in r["stage"]], 100 * r["top1"].to_numpy(dtype=float), marker="o",
                    color=CHAIN_COLORS[i % len(CHAIN_COLORS)], label=f"teacher: {chain}")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax = axes[1][col]
        sp = spread[spread["protocol"] == protocol]
        for name, style in (("std", "o-"), ("range", "s--")):
            ax.plot([xs[s] for s in sp["stage"]], 100 * sp[name].to_numpy(dtype=float), style,
                    label="std" if name == "std" else "max - min")
        ax.set_xticks(range(len(stages)), [str(s) for s in stages])
        ax.set_xlabel("stage (teacher = the stage-0 teacher itself)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[1][0].set_ylabel("spread across teachers (points)")
    fig.suptitle("Teacher-swap study: dBOT students from different teachers, stage by stage")
    save_png(fig, path)
