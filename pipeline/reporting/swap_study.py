"""The teacher-swap study (dBOT's Table 1): dBOT chains started from different stage-0 teachers.

From the report's seed-mean table (pipeline.reporting.seed_stats.seed_mean) and params dbot.chains: per stage, each
chain's student top-1 (k-NN and linear probe; mean over seeds) and the spread across teachers (sample
standard deviation and max - min of the chains' means), next to the seed spread (the chains' mean standard
deviation over seeds): a spread across teachers within the seed spread is marked. Row "teacher" holds the
stage-0 teachers themselves, where the study evaluated them (an external file is not evaluated). dBOT's
claim: the spread across teachers shrinks stage by stage.
"""
from __future__ import annotations

import math

import pandas as pd

from pipeline.layout import TEACHER_SOURCES, parse_dbot_key
from pipeline.plots import stage_order
from pipeline.reporting.seed_stats import WITHIN
from pipeline.reporting.tables import markdown_table

PROTOCOLS = ("knn", "linprobe")
COLUMNS = ["stage", "chain", "protocol", "top1", "seed_std"]


def chain_rows(table: pd.DataFrame, chains: dict[str, str]) -> pd.DataFrame:
    """Rows (stage, chain, protocol, top1, seed_std): stage 'teacher', then '0', '1', ... (strings)."""
    top1 = table[(table.metric == "top1") & table.protocol.isin(PROTOCOLS)]
    std = top1["std"] if "std" in top1 else pd.Series(math.nan, index=top1.index)
    rows = []
    for (_, r), s in zip(top1.iterrows(), std):
        if r.weights.startswith("dbot_"):
            chain, stage = parse_dbot_key(r.weights.removeprefix("dbot_"))
            if chain in chains:
                rows.append([str(stage), chain, r.protocol, float(r.value), float(s)])
    for chain, source in chains.items():
        if source in TEACHER_SOURCES:
            for (_, r), s in zip(top1.iterrows(), std):
                if r.weights == source:
                    rows.append(["teacher", chain, r.protocol, float(r.value), float(s)])
    return pd.DataFrame(rows, columns=COLUMNS)


def spread(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (stage, protocol): chains, mean, sample std (ddof 1) and max - min of top-1 across the chains, and
    seed_std, the chains' mean standard deviation over seeds (NaN with one seed)."""
    if rows.empty:
        return pd.DataFrame(columns=["stage", "protocol", "chains", "mean", "std", "range", "seed_std"])
    out = rows.groupby(["stage", "protocol"]).agg(
        chains=("top1", "count"), mean=("top1", "mean"),
        std=("top1", lambda v: float(v.std(ddof=1)) if len(v) > 1 else math.nan),
        range=("top1", lambda v: float(v.max() - v.min())), seed_std=("seed_std", "mean")).reset_index()
    return out.sort_values(["stage", "protocol"], key=lambda s: s.map(stage_order) if s.name == "stage" else s)


def markdown(rows: pd.DataFrame, chains: dict[str, str]) -> str:
    """The swap-study section of summary.md: one row per stage, top-1 (%) k-NN / linear per chain, and spread."""
    if rows.empty:
        return ""
    sp = spread(rows).set_index(["stage", "protocol"])
    value = rows.set_index(["stage", "chain", "protocol"])["top1"]
    header = ["stage"] + [f"{c} ({chains[c]})" for c in chains] + [
        "k-NN std", "k-NN max-min", "k-NN seed std", "linear std", "linear max-min", "linear seed std"]
    body = []

    def pct(v):
        return "—" if v is None or pd.isna(v) else f"{100 * v:.1f}"

    for stage in sorted(rows.stage.unique(), key=stage_order):
        cells = [stage]
        for chain in chains:
            cells.append(" / ".join(pct(value.get((stage, chain, p))) for p in PROTOCOLS))
        for p in PROTOCOLS:
            hit = sp.loc[(stage, p)] if (stage, p) in sp.index else None
            if hit is None:
                cells += ["—"] * 3
                continue
            within = not pd.isna(hit["seed_std"]) and not pd.isna(hit["std"]) and hit["std"] <= hit["seed_std"]
            cells += [pct(hit["std"]) + (f" {WITHIN}" if within else ""), pct(hit["range"]), pct(hit["seed_std"])]
        body.append(cells)
    lines = markdown_table(header, body, "lr")
    return ("\n## Teacher-swap study\n\n"
            "dBOT chains that differ only in their stage-0 teacher (params dbot.chains; the same student seeds, "
            "stages and settings). Cells: k-NN / linear top-1 (%) of each chain's student after each stage (mean "
            "over seeds); row `teacher` is the stage-0 teacher itself. Spread across teachers: sample standard "
            "deviation and max - min of the chains, in points, next to the seed std (the chains' mean standard "
            f"deviation over seeds; — with one seed); {WITHIN} marks a spread across teachers within the seed "
            "spread. dBOT's claim is that the spread across teachers shrinks stage by stage. Data: swap_study.csv, "
            "swap_spread.csv; plot: plots/swap_study.png.\n\n" + "\n".join(lines) + "\n")
