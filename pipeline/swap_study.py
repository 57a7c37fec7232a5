"""The teacher-swap study (dBOT's Table 1): dBOT chains started from different stage-0 teachers.

From the report's long-format table (pipeline.report) and params dbot.chains: per stage, each chain's
student top-1 (k-NN and linear probe) and the spread across teachers (sample standard deviation and
max - min). Row "teacher" holds the stage-0 teachers themselves, where the study evaluated them (an
external file is not evaluated). dBOT's claim: the spread shrinks stage by stage.
"""
from __future__ import annotations

import pandas as pd

from pipeline.layout import TEACHER_SOURCES, parse_dbot_key

PROTOCOLS = ("knn", "linprobe")


def chain_rows(table: pd.DataFrame, chains: dict[str, str]) -> pd.DataFrame:
    """Long rows (stage, chain, protocol, top1) of the study: stage 'teacher', then 0, 1, ... as strings."""
    top1 = table[(table.metric == "top1") & table.protocol.isin(PROTOCOLS)]
    rows = []
    for _, r in top1.iterrows():
        if r.weights.startswith("dbot_"):
            chain, stage = parse_dbot_key(r.weights.removeprefix("dbot_"))
            if chain in chains:
                rows.append({"stage": str(stage), "chain": chain, "protocol": r.protocol, "top1": float(r.value)})
    for chain, source in chains.items():
        if source in TEACHER_SOURCES:
            for _, r in top1[top1.weights == source].iterrows():
                rows.append({"stage": "teacher", "chain": chain, "protocol": r.protocol, "top1": float(r.value)})
    return pd.DataFrame(rows, columns=["stage", "chain", "protocol", "top1"])


def stage_order(stage: str) -> int:
    return -1 if stage == "teacher" else int(stage)


def spread(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (stage, protocol): number of chains, mean, sample std (ddof 1) and max - min of top-1."""
    if rows.empty:
        return pd.DataFrame(columns=["stage", "protocol", "chains", "mean", "std", "range"])
    out = rows.groupby(["stage", "protocol"])["top1"].agg(
        chains="count", mean="mean", std=lambda v: float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
        range=lambda v: float(v.max() - v.min())).reset_index()
    return out.sort_values(["stage", "protocol"], key=lambda s: s.map(stage_order) if s.name == "stage" else s)


def markdown(rows: pd.DataFrame, chains: dict[str, str]) -> str:
    """The swap-study section of summary.md: one row per stage, top-1 (%) k-NN / linear per chain, and spread."""
    if rows.empty:
        return ""
    sp = spread(rows).set_index(["stage", "protocol"])
    value = rows.set_index(["stage", "chain", "protocol"])["top1"]
    header = ["stage"] + [f"{c} ({chains[c]})" for c in chains] + [
        "k-NN std", "k-NN max-min", "linear std", "linear max-min"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":--"] + ["--:"] * (len(header) - 1)) + "|"]

    def pct(v):
        return "—" if v is None or pd.isna(v) else f"{100 * v:.1f}"

    for stage in sorted(rows.stage.unique(), key=stage_order):
        cells = [stage]
        for chain in chains:
            cells.append(" / ".join(pct(value.get((stage, chain, p))) for p in PROTOCOLS))
        for p in PROTOCOLS:
            hit = sp.loc[(stage, p)] if (stage, p) in sp.index else None
            cells += [pct(None if hit is None else hit["std"]), pct(None if hit is None else hit["range"])]
        lines.append("| " + " | ".join(cells) + " |")
    return ("\n## Teacher-swap study\n\n"
            "dBOT chains that differ only in their stage-0 teacher (params dbot.chains; the same student seeds, "
            "stages and settings). Cells: k-NN / linear top-1 (%) of each chain's student after each stage; row "
            "`teacher` is the stage-0 teacher itself. Spread across teachers: sample standard deviation and max - min, "
            "in points. dBOT's claim is that the spread shrinks stage by stage. Data: swap_study.csv, swap_spread.csv; plot: "
            "plots/swap_study.png.\n\n" + "\n".join(lines) + "\n")
