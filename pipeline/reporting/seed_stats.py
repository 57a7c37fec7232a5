"""Statistics over the study's seeds: every number of the report is a mean over seeds with its spread, and
every comparison the report draws (method vs each floor, random_init and pixels; method vs MAE; dBOT stage vs
the stage before) is marked when its difference is within the seed spread, so no claim rests on one lucky run.
pipeline.reporting.claims reads its verdicts from the same numbers.

The spread of a metric is its sample standard deviation over seeds (ddof 1; undefined with one seed). A
difference between two encoders is "within the seed spread" when |mean_a - mean_b| <= max(std_a, std_b).
"""
from __future__ import annotations

import math

import pandas as pd

from pipeline.layout import FLOORS, SINGLE_STAGE_METHODS, dbot_key, dbot_weights
from pipeline.reporting.tables import markdown_table

GROUP = ["method", "stage", "weights", "evaluated", "protocol", "metric", "settings"]
WITHIN = "≈"          # the mark of a difference within the seed spread
PROTOCOLS = (("knn", "k-NN"), ("linprobe", "linear"))


def seed_mean(table: pd.DataFrame) -> pd.DataFrame:
    """The long table (one row per seed) -> one row per (weights, protocol, metric): value = mean over seeds,
    std = sample std over seeds (NaN with one seed), seeds = how many seeds. Row order is kept."""
    grouped = table.groupby(GROUP, dropna=False, sort=False)["value"]
    out = grouped.agg(value="mean", std=lambda v: float(v.std(ddof=1)) if len(v) > 1 else math.nan,
                      seeds="count").reset_index()
    out["stage"] = out["stage"].astype("Int64")
    return out


def stat(agg: pd.DataFrame, weights: str, protocol: str, metric: str = "top1") -> tuple[float, float] | None:
    """(mean over seeds, std over seeds) of one metric of one encoder, or None where the table lacks it."""
    hit = agg[(agg.weights == weights) & (agg.protocol == protocol) & (agg.metric == metric)]
    return None if hit.empty else (float(hit.value.iloc[0]), float(hit["std"].iloc[0]))


def comparisons(agg: pd.DataFrame, params_chains: dict[str, str], stages: list[int]) -> list[tuple[str, str]]:
    """The pairs (a, b) the report compares, a against b: every trained encoder against each floor (random_init,
    then pixels), every other method and each chain's last dBOT stage against MAE, each dBOT stage against the
    one before."""
    present = set(agg.weights)
    trained = [w for w in dict.fromkeys(agg.weights) if w not in FLOORS]
    pairs = [(w, floor) for w in trained for floor in FLOORS]
    last = [dbot_weights(dbot_key(c, stages[-1])) for c in params_chains] if stages else []
    pairs += [(w, "mae") for w in [m for m in SINGLE_STAGE_METHODS if m != "mae"] + ["supervised"] + last]
    for chain in params_chains:
        for k in stages[1:]:
            pairs.append((dbot_weights(dbot_key(chain, k)), dbot_weights(dbot_key(chain, k - 1))))
    return [(a, b) for a, b in pairs if a in present and b in present]


def difference(agg: pd.DataFrame, a: str, b: str, protocol: str,
               metric: str = "top1") -> tuple[float, bool | None] | None:
    """(mean_a - mean_b, within the seed spread?) of a metric (top-1); within is None when the spread is undefined."""
    sa, sb = stat(agg, a, protocol, metric), stat(agg, b, protocol, metric)
    if sa is None or sb is None:
        return None
    delta, noise = sa[0] - sb[0], max(sa[1], sb[1])
    return delta, within(delta, noise)


def within(delta: float, noise: float) -> bool | None:
    """|delta| <= noise (the larger seed std of the two sides); None when the spread is undefined (one seed)."""
    return None if math.isnan(noise) else abs(delta) <= noise


def markdown(agg: pd.DataFrame, chains: dict[str, str], stages: list[int]) -> str:
    """The 'Differences against the seed spread' section of summary.md."""
    seeds = int(agg["seeds"].max()) if len(agg) else 0
    rows = []
    for a, b in comparisons(agg, chains, stages):
        cells = []
        for protocol, _ in PROTOCOLS:
            d = difference(agg, a, b, protocol)
            cells.append("—" if d is None else f"{100 * d[0]:+.1f}" + (f" {WITHIN}" if d[1] else ""))
        rows.append([f"{a} vs {b}", *cells])
    lines = markdown_table(["comparison", "k-NN Δ (points)", "linear Δ (points)"], rows, "lr")
    if seeds < 2:
        note = (f"One seed: no seed spread, so none of these differences is tested; set params `seeds` to several "
                f"seeds to mark the differences that are within their spread ({WITHIN}).")
    else:
        note = (f"{seeds} seeds: a difference marked {WITHIN} is within the seed spread (|Δ| <= the larger of the "
                "two standard deviations over seeds): no claim should rest on it.")
    return "\n## Differences against the seed spread\n\n" + note + "\n\n" + "\n".join(lines) + "\n"


def fmt_mean(value: float | None, std: float | None, scale: float = 100.0, spec: str = ".1f") -> str:
    """'68.2' (one seed) or '68.2 ± 1.1' (several)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = format(scale * value, spec)
    return text if std is None or math.isnan(std) else f"{text} ± {format(scale * std, spec)}"
