"""The report's claims: what the papers claim (../shared/METHODS.md, "What the papers claim"), checked on this
study's own numbers and marked holds / does not hold / within the seed spread, for summary.md ("Claims") and
claims.csv (one row per comparison: claim, comparison, metric, value, reference, delta, spread, verdict).

Input: the report's seed-mean table (pipeline.reporting.seed_stats.seed_mean: per weights id, protocol and metric, the
mean over seeds in `value` and the sample std in `std`), params dbot.chains, the dBOT stages, and the spread
across teachers of the teacher-swap study (pipeline.reporting.swap_study.spread). Each claim is a set of comparisons of
a value against a reference on one metric (top-1 fractions), wherever the table has both:
- above_random_init, above_pixels: every trained encoder (each method, supervised, each dBOT stage) above the
  random-init floor, and above the raw-pixel floor; k-NN, linear-probe and fine-tune top-1;
- dbot_stage_gain: each chain's dBOT stage k+1 >= its stage k; k-NN and linear top-1;
- teacher_spread_shrinks: the spread across teachers (sample std of the chains' top-1) smaller at each stage
  than at the one before, from the stage-0 teachers on; k-NN and linear;
- beats_mae: SdAE, BootMAE and RC-MAE >= MAE at equal epochs (each trains pretrain.epochs); k-NN, linear and
  fine-tune top-1;
- rcmae_early_knn: RC-MAE's online k-NN above MAE's early in training: the mean online k-NN top-1 over the
  first half of the epochs (summary.csv's pre-training metric early_online_knn_top1).

Verdict of one comparison, delta = value - reference: "within the seed spread" when the study has several
seeds and |delta| <= spread, the larger of the two sides' seed std (pipeline.reporting.seed_stats.within; for the
teacher spread, the larger of the two stages' mean seed std); otherwise "holds" when delta has the claim's
sign (> 0 for "above", >= 0 for ">=", < 0 for "shrinks"), else "does not hold". With one seed the spread is
undefined and the sign alone decides. A claim as a whole does not hold when any comparison does not hold, is
within the seed spread when none fails and some are within it, and holds when every comparison holds.
"""
from __future__ import annotations

import math

import pandas as pd

from pipeline.layout import FLOORS, dbot_key, dbot_weights
from pipeline.reporting import seed_stats
from pipeline.reporting.tables import markdown_table

HOLDS, FAILS, SPREAD = "holds", "does not hold", "within the seed spread"
EARLY_KNN = "early_online_knn_top1"     # pipeline.reporting.report's pre-training row of the online k-NN, first half
PROTOCOLS = (("knn", "k-NN"), ("linprobe", "linear probe"), ("finetune", "fine-tune"))
CLAIMS = {   # id -> (what is claimed, the sign delta must have)
    "above_random_init": ("every trained encoder is above the random-init floor", ">"),
    "above_pixels": ("every trained encoder is above the raw-pixel floor", ">"),
    "dbot_stage_gain": ("dBOT stage k+1 >= stage k, per chain", ">="),
    "teacher_spread_shrinks": ("the spread across teachers shrinks stage by stage (dBOT)", "<"),
    "beats_mae": ("SdAE, BootMAE and RC-MAE >= MAE at equal epochs", ">="),
    "rcmae_early_knn": ("RC-MAE's online k-NN above MAE's in the first half of training", ">"),
}
COLUMNS = ["claim", "comparison", "metric", "value", "reference", "delta", "spread", "verdict"]


def verdict(delta: float, spread: float, sense: str) -> str:
    """One comparison's verdict: within the seed spread, else whether delta has the sign `sense` (>, >=, <)."""
    if seed_stats.within(delta, spread):
        return SPREAD
    return HOLDS if {">": delta > 0, ">=": delta >= 0, "<": delta < 0}[sense] else FAILS


def overall(verdicts: list[str]) -> str:
    """A claim's verdict from its comparisons' ("not tested" when the study has none of them)."""
    if not verdicts:
        return "not tested"
    return FAILS if FAILS in verdicts else SPREAD if SPREAD in verdicts else HOLDS


def _row(claim: str, comparison: str, metric: str, value: float, reference: float, spread: float) -> dict:
    delta = value - reference
    return {"claim": claim, "comparison": comparison, "metric": metric, "value": value, "reference": reference,
            "delta": delta, "spread": spread, "verdict": verdict(delta, spread, CLAIMS[claim][1])}


def _pairs(agg: pd.DataFrame, claim: str, pairs: list[tuple[str, str]], protocols) -> list[dict]:
    """Rows of claim for each (a, b) in pairs and each protocol (metric top1, or (protocol, metric)) both have."""
    rows = []
    for a, b in pairs:
        for protocol in protocols:
            protocol, metric = protocol if isinstance(protocol, tuple) else (protocol, "top1")
            sa, sb = seed_stats.stat(agg, a, protocol, metric), seed_stats.stat(agg, b, protocol, metric)
            if sa is not None and sb is not None:
                rows.append(_row(claim, f"{a} vs {b}", f"{protocol}/{metric}", sa[0], sb[0], max(sa[1], sb[1])))
    return rows


def _teacher_spread(spread: pd.DataFrame) -> list[dict]:
    """teacher_spread_shrinks: each stage's spread across teachers against the stage before's."""
    from pipeline.plots import stage_order

    rows = []
    for protocol in ("knn", "linprobe"):
        own = spread[(spread.protocol == protocol) & spread["std"].notna()]
        own = own.sort_values("stage", key=lambda s: s.map(stage_order))
        for (_, before), (_, after) in zip(own.iloc[:-1].iterrows(), own.iloc[1:].iterrows()):
            name = "teachers" if before.stage == "teacher" else f"stage {before.stage}"
            rows.append(_row("teacher_spread_shrinks", f"spread across teachers, stage {after.stage} vs {name}",
                             f"{protocol}/top1 std across teachers",
                             float(after["std"]), float(before["std"]), max(after.seed_std, before.seed_std)))
    return rows


def check(agg: pd.DataFrame, chains: dict[str, str], stages: list[int], spread: pd.DataFrame) -> pd.DataFrame:
    """Every claim's comparisons (COLUMNS) from the seed-mean table, chains (dbot.chains), the dBOT stages and the
    teacher-swap spread (swap_study.spread)."""
    protocols = [p for p, _ in PROTOCOLS]
    evaluated = set(agg.loc[agg.protocol.isin(protocols), "weights"])
    trained = [w for w in dict.fromkeys(agg.weights) if w not in FLOORS and w in evaluated]
    gains = [(dbot_weights(dbot_key(c, k)), dbot_weights(dbot_key(c, k - 1))) for c in chains for k in stages[1:]]
    rows = (_pairs(agg, "above_random_init", [(w, "random_init") for w in trained], protocols)
            + _pairs(agg, "above_pixels", [(w, "pixels") for w in trained], protocols)
            + _pairs(agg, "dbot_stage_gain", gains, protocols)
            + (_teacher_spread(spread) if not spread.empty else [])
            + _pairs(agg, "beats_mae", [(m, "mae") for m in ("sdae", "bootmae", "rcmae")], protocols)
            + _pairs(agg, "rcmae_early_knn", [("rcmae", "mae")], [("pretrain", EARLY_KNN)]))
    return pd.DataFrame(rows, columns=COLUMNS)


def _pct(v: float) -> str:
    return "—" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def _cell(row) -> str:
    """'68.2 vs 50.4 (+17.8): holds' (percent, points)."""
    return f"{_pct(row.value)} vs {_pct(row.reference)} ({100 * row.delta:+.1f}): {row.verdict}"


def _detail(found: pd.DataFrame) -> list[str]:
    """One markdown row per (claim, comparison), a cell per protocol (the online k-NN in the k-NN column)."""
    names = dict(PROTOCOLS, pretrain="k-NN")
    columns = list(dict.fromkeys(names.values()))
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in found.itertuples():
        protocol = r.metric.split("/")[0]
        what = " (online k-NN, first half of the epochs)" if protocol == "pretrain" else ""
        cells.setdefault((r.claim, r.comparison + what), {})[names.get(protocol, protocol)] = _cell(r)
    return markdown_table(["claim", "comparison", *columns],
                          [[claim, comparison, *(c.get(col, "—") for col in columns)]
                           for (claim, comparison), c in cells.items()], "l")


def markdown(found: pd.DataFrame, seeds: int) -> str:
    """The "Claims" section of summary.md: each claim's verdict and counts, then every comparison."""
    rows = []
    for claim, (text, _) in CLAIMS.items():
        v = list(found.loc[found.claim == claim, "verdict"])
        rows.append([f"{text} (`{claim}`)", f"**{overall(v)}**",
                     f"{v.count(HOLDS)} / {v.count(FAILS)} / {v.count(SPREAD)}"])
    lines = markdown_table(["claim", "verdict", "comparisons: holds / does not hold / within the spread"], rows, "l")
    detail = _detail(found)
    if seeds < 2:
        note = ("One seed: the seed spread is undefined, so each verdict is the sign of Δ alone (none can be "
                "within the seed spread); set params `seeds` to several seeds to test them against it.")
    else:
        note = (f"{seeds} seeds: a comparison is within the seed spread when |Δ| <= the larger seed standard "
                "deviation of its two sides; otherwise it holds or does not hold by the sign of Δ.")
    return ("\n## Claims\n\n"
            "What the papers claim, checked on this study's numbers (top-1 on the validation split, mean over seeds; "
            "the floors are random_init and pixels, k-NN and linear probe on the normalised raw pixels). A claim does "
            "not hold when any of its comparisons does not hold. " + note + " Cells: value vs reference in % (Δ "
            "in points): verdict; for the teacher spread, the std across teachers of the later stage vs the earlier "
            "one. Data: claims.csv.\n\n"
            + "\n".join(lines) + "\n\n" + "\n".join(detail) + "\n")
