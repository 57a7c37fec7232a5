"""The report: long-format CSV, markdown summary and plots from fake metrics files."""
import json
import re

import matplotlib.image
import pandas as pd
import pytest

from pipeline.errors import PipelineError
from pipeline.reporting.report import COLUMNS, build_report


def unpadded(md: str) -> str:
    """The markdown with runs of spaces as one: table rows as "| a | b |" whatever to_markdown's column widths."""
    return re.sub(" +", " ", md)


KNN = {"k": 20, "temperature": 0.07, "feature": "cls"}
LINPROBE = {"epochs": 30, "batch_size": 256, "lr": 0.1, "feature": "cls"}
# weights id -> (method, stage, knn top1, linprobe top1); the floors (random init, raw pixels) are not pre-trained
ENCODERS = {"random_init": ("random", None, 0.123, 0.2049), "pixels": ("pixels", None, 0.55, 0.58),
            "mae": ("mae", 0, 0.5, 0.6),
            "dbot_random_stage0": ("dbot", 0, 0.61, 0.7), "dbot_random_stage1": ("dbot", 1, 0.66, 0.745),
            "dbot_random_stage2": ("dbot", 2, 0.931, 0.8),
            "dbot_mae_stage0": ("dbot", 0, 0.71, 0.75), "dbot_mae_stage1": ("dbot", 1, 0.69, 0.76),
            "dbot_mae_stage2": ("dbot", 2, 0.92, 0.81)}
CHAINS = {"random": "random_init", "mae": "mae"}          # the teacher-swap study: two chains
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _pretrain_doc(weights, method, stage, seed=0):
    epochs = [{"epoch": e, "loss": 0.5 - 0.05 * e - 0.01 * stage, "lr": 1e-4, "images_per_s": 800.0,
               "seconds": 5.0} for e in range(4)]
    return {"node": "pretrain_dbot" if method == "dbot" else "pretrain", "method": method, "stage": stage, "seed": seed,
            "weights": weights, "epochs": epochs,
            "final": {"loss": epochs[-1]["loss"], "images_seen": 40000, "wall_s": 20.0 + stage,
                      "train_flops": 1e15 * (1 + stage)}}


def _eval_doc(protocol, weights, method, stage, top1, seed=0):
    doc = {"protocol": protocol, "settings": KNN if protocol == "knn" else LINPROBE,
           "weights": {"id": weights, "method": method, "stage": stage, "seed": seed,
                       "evaluated": method if method in ("random", "pixels") else "student",
                       "path": f"results/x/{weights}/encoder.safetensors", "sha256": "0" * 64},
           "metrics": {"top1": top1, "top5": 0.99}}
    if protocol == "linprobe":
        doc["history"] = [{"epoch": 0, "train_loss": 1.2, "val_top1": top1}]
    return doc


def _inputs(root, seed=0, shift=0.0):
    """Metrics files of one seed: ENCODERS' top-1, plus shift (the seed's deviation)."""
    pretrain, evals = [], []
    for weights, (method, stage, knn, lin) in ENCODERS.items():
        if method not in ("random", "pixels"):
            pretrain.append(_write(root / f"seed{seed}" / "pretrain" / weights / "metrics.json",
                                   _pretrain_doc(weights, method, stage, seed)))
        for protocol, top1 in (("knn", knn), ("linprobe", lin)):
            evals.append(_write(root / f"seed{seed}" / protocol / weights / "metrics.json",
                                _eval_doc(protocol, weights, method, stage, top1 + shift, seed)))
    return pretrain, evals


@pytest.fixture
def inputs(tmp_path):
    return _inputs(tmp_path / "in")


def test_report_writes_csv_markdown_and_plots(tmp_path, inputs):
    out = tmp_path / "results"
    table = build_report(*inputs, out, chains=CHAINS)

    csv = pd.read_csv(out / "summary.csv")
    assert list(csv.columns) == COLUMNS and list(table.columns) == COLUMNS
    assert len(csv) == 7 * 4 + 9 * 2 * 2                      # pretrain rows + (knn, linprobe) x (top1, top5)
    assert list(csv.weights.drop_duplicates()) == list(ENCODERS) and set(csv.seed) == {0}
    top1 = csv[csv.metric == "top1"].set_index(["weights", "protocol"]).value
    assert (top1["dbot_random_stage2", "knn"] == pytest.approx(0.931)
            and top1["random_init", "linprobe"] == pytest.approx(0.2049))
    pre = csv[csv.protocol == "pretrain"].set_index(["weights", "metric"]).value
    assert pre["dbot_random_stage1", "wall_s"] == 21.0 and pre["mae", "images_seen"] == 40000
    assert pre["dbot_random_stage2", "final_loss"] == pytest.approx(0.5 - 0.15 - 0.02)
    assert set(csv.metric[csv.protocol == "pretrain"]) == {"final_loss", "wall_s", "images_seen", "train_flops"}
    assert csv.stage[csv.weights.isin(["random_init", "pixels"])].isna().all() and set(csv.stage.dropna()) == {0, 1, 2}
    assert json.loads(csv.settings[csv.protocol == "knn"].iloc[0]) == KNN
    assert str(table.stage.dtype) == "Int64"

    md = unpadded((out / "summary.md").read_text())
    assert all(w in md for w in ENCODERS)
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    summary = lines[1:1 + len(ENCODERS)]
    assert [line.split("|")[1].strip() for line in summary] == list(ENCODERS)   # floor, mae, chains (random first)
    # train compute sums the chain: stages 0, 1, 2 cost 1, 2, 3 PFLOP -> 6000 TFLOP up to stage 2; the mae
    # chain also counts its teacher's training (1 PFLOP)
    assert "| dbot_random_stage2 | dbot | 2 | student | 1 | 93.1 | 80.0 | — | — | — | 0.3300 | 22.0 | 6000.0 |" in md
    assert "| dbot_mae_stage2 | dbot | 2 | student | 1 | 92.0 | 81.0 | — | — | — | 0.3300 | 22.0 | 7000.0 |" in md
    assert "| mae | mae | 0 | student | 1 | 50.0 | 60.0 | — | — | — | 0.3500 | 20.0 | 1000.0 |" in md
    assert "| random_init | random | | random | 1 | 12.3 | 20.5 | — | — | — | — | — | — |" in md
    assert "| pixels | pixels | | pixels | 1 | 55.0 | 58.0 | — | — | — | — | — | — |" in md     # the second floor
    # comparisons: one seed, so no difference is marked as within the seed spread
    assert "One seed: no seed spread" in md and "| dbot_random_stage1 vs dbot_random_stage0 | +5.0 | +4.5 |" in md
    assert "| mae vs random_init | +37.7 | +39.5 |" in md and "| mae vs pixels | -5.0 | +2.0 |" in md
    assert "| pixels vs random_init" not in md                                    # floors are not compared
    # the claims: mae's k-NN is below the pixel floor, so "above the raw-pixel floor" does not hold
    claims = pd.read_csv(out / "claims.csv")
    assert list(claims.columns) == ["claim", "comparison", "metric", "value", "reference", "delta", "spread", "verdict"]
    row = claims[(claims.claim == "above_pixels") & (claims.comparison == "mae vs pixels")
                 & (claims.metric == "knn/top1")]
    assert row.verdict.tolist() == ["does not hold"] and row.delta.iloc[0] == pytest.approx(-0.05)
    assert ("| every trained encoder is above the raw-pixel floor (`above_pixels`) | **does not hold** | 13 / 1 / 0 |"
            in md)
    assert ("| above_pixels | mae vs pixels | 50.0 vs 55.0 (-5.0): does not hold | 60.0 vs 58.0 (+2.0): holds | — |"
            in md)
    assert "k-NN: feature=cls, k=20, temperature=0.07;" in md and "linear probe: batch_size=256" in md

    # the teacher-swap study: per stage each chain's k-NN / linear top-1, then the spread across teachers
    assert "| teacher | 12.3 / 20.5 | 50.0 / 60.0 | 26.7 | 37.7 | — | 27.9 | 39.5 | — |" in md
    assert "| 2 | 93.1 / 80.0 | 92.0 / 81.0 | 0.8 | 1.1 | — | 0.7 | 1.0 | — |" in md
    spread = pd.read_csv(out / "swap_spread.csv").set_index(["stage", "protocol"])
    assert list(spread.index.get_level_values(0).unique()) == ["teacher", "0", "1", "2"]
    assert spread.loc[("2", "knn"), "range"] == pytest.approx(0.011)
    assert spread.loc[("0", "linprobe"), "std"] == pytest.approx(0.05 / 2 ** 0.5)
    assert len(pd.read_csv(out / "swap_study.csv")) == 4 * 2 * 2         # (teacher + 3 stages) x chains x protocols

    for name in ("pretrain_loss", "chain_accuracy", "accuracy_vs_compute", "swap_study"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(png).shape[0] > 100
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_missing_or_bad_input_is_a_pipeline_error_naming_the_file(tmp_path, inputs):
    pretrain, evals = inputs
    gone = evals[3]
    gone.unlink()
    with pytest.raises(PipelineError, match=f"missing file: {gone}"):
        build_report(pretrain, evals, tmp_path / "results")
    _write(gone, {"protocol": "knn", "metrics": {}})
    with pytest.raises(PipelineError, match=f"{gone} is not a metrics file.*settings"):
        build_report(pretrain, evals, tmp_path / "results")
    assert not (tmp_path / "results").exists()                 # nothing written before all inputs are checked


def test_duplicate_metrics_are_rejected(tmp_path, inputs):
    pretrain, evals = inputs
    with pytest.raises(PipelineError, match="two metrics files give knn/top1 of random_init"):
        build_report(pretrain, evals + evals[:1], tmp_path / "results")


def test_several_seeds_give_mean_std_and_mark_differences_within_the_seed_spread(tmp_path):
    # seed 0 as ENCODERS, seed 1 two points higher everywhere: std over seeds = 2 / sqrt(2) = 1.41 points
    pretrain, evals = _inputs(tmp_path / "in", seed=0)
    more = _inputs(tmp_path / "in", seed=1, shift=0.02)
    table = build_report(pretrain + more[0], evals + more[1], tmp_path / "results", chains=CHAINS)
    assert set(table.seed) == {0, 1} and len(table) == 2 * (7 * 4 + 9 * 2 * 2)
    md = unpadded((tmp_path / "results" / "summary.md").read_text())
    assert "| dbot_random_stage2 | dbot | 2 | student | 2 | 94.1 ± 1.4 | 81.0 ± 1.4 |" in md
    assert "2 seeds: a difference marked ≈ is within the seed spread" in md
    # mae chain stage 2 vs 1: k-NN +23.0, linear +5.0 (beyond the 1.4-point spread); stage 1 vs 0: k-NN -2.0
    # (beyond it), linear +1.0 (within it)
    assert "| dbot_mae_stage2 vs dbot_mae_stage1 | +23.0 | +5.0 |" in md
    assert "| dbot_mae_stage1 vs dbot_mae_stage0 | -2.0 | +1.0 ≈ |" in md
    # swap study at stage 2: the teachers' spread (0.8 / 0.7 points) is within the seed spread (1.4)
    assert "| 2 | 94.1 / 81.0 | 93.0 / 82.0 | 0.8 ≈ | 1.1 | 1.4 | 0.7 ≈ | 1.0 | 1.4 |" in md
    spread = pd.read_csv(tmp_path / "results" / "swap_spread.csv").set_index(["stage", "protocol"])
    assert spread.loc[("0", "knn"), "seed_std"] == pytest.approx(0.02 / 2 ** 0.5)


# ---- the claims section (pipeline.reporting.claims) on small seed-mean tables ----------------------------------------

CLAIM_CHAINS = {"random": "random_init", "mae": "mae"}
# k-NN = linear top-1 of each encoder in three studies: every claim holds (one seed), every claim fails (one
# seed), every comparison within the seed spread (3 seeds, std 6 points); plus RC-MAE's and MAE's online k-NN
# over the first half of training
HOLD = {"random_init": 0.30, "pixels": 0.40, "mae": 0.60, "sdae": 0.62, "bootmae": 0.63, "rcmae": 0.61,
        "supervised": 0.70, "dbot_random_stage0": 0.55, "dbot_random_stage1": 0.65, "dbot_mae_stage0": 0.62,
        "dbot_mae_stage1": 0.66}            # teacher spread (std across chains): 21.2 -> 4.9 -> 0.7 points
FAIL = dict(HOLD, mae=0.35, bootmae=0.32, supervised=0.25, dbot_mae_stage1=0.50)   # spread 3.5 -> 4.9 -> 10.6
SPREAD = {"random_init": 0.50, "pixels": 0.52, "mae": 0.54, "sdae": 0.55, "bootmae": 0.53, "rcmae": 0.54,
          "supervised": 0.54, "dbot_random_stage0": 0.53, "dbot_random_stage1": 0.55, "dbot_mae_stage0": 0.54,
          "dbot_mae_stage1": 0.53}
EARLY = {"hold": (0.5, 0.4), "fail": (0.3, 0.4), "spread": (0.45, 0.44)}   # (rcmae, mae)


def seed_mean_table(top1: dict, early: tuple, std: float = float("nan"), seeds: int = 1) -> pd.DataFrame:
    """A table as pipeline.reporting.seed_stats.seed_mean makes it: k-NN and linear top-1 of every encoder, and the
    pre-training row early_online_knn_top1 of rcmae and mae."""
    from pipeline.layout import describe_weights
    from pipeline.reporting.claims import EARLY_KNN

    rows = []
    for weights, value in top1.items():
        info = describe_weights(weights)
        rows += [{"method": info["method"], "stage": info["stage"], "weights": weights, "protocol": p, "metric": "top1",
                  "value": value, "std": std, "seeds": seeds} for p in ("knn", "linprobe")]
    rows += [{"method": w, "stage": 0, "weights": w, "protocol": "pretrain", "metric": EARLY_KNN, "value": v,
              "std": std, "seeds": seeds} for w, v in zip(("rcmae", "mae"), early)]
    table = pd.DataFrame(rows).assign(evaluated="", settings="")
    table["stage"] = table["stage"].astype("Int64")
    return table


@pytest.mark.parametrize("case,top1,std,seeds,expected", [
    ("hold", HOLD, float("nan"), 1, "holds"),
    ("fail", FAIL, float("nan"), 1, "does not hold"),
    ("spread", SPREAD, 0.06, 3, "within the seed spread")])
def test_each_claim_holds_fails_or_falls_within_the_seed_spread(case, top1, std, seeds, expected):
    from pipeline.reporting import claims
    from pipeline.reporting.report import claims_table

    found = claims_table(seed_mean_table(top1, EARLY[case], std, seeds), CLAIM_CHAINS)
    assert list(found.columns) == claims.COLUMNS
    verdicts = {c: claims.overall(list(found.loc[found.claim == c, "verdict"])) for c in claims.CLAIMS}
    assert verdicts == dict.fromkeys(claims.CLAIMS, expected)
    # 9 trained encoders x 2 protocols per floor; 2 chains x 1 stage gain x 2; (teacher -> 0 -> 1) x 2; 3 x 2; 1
    assert found.claim.value_counts().to_dict() == {"above_random_init": 18, "above_pixels": 18, "dbot_stage_gain": 4,
                                                     "teacher_spread_shrinks": 4, "beats_mae": 6, "rcmae_early_knn": 1}
    assert (found.spread.isna() if seeds == 1 else found.spread > 0).all()
    md = unpadded(claims.markdown(found, seeds))
    assert all(f"(`{c}`) | **{expected}** |" in md for c in claims.CLAIMS)


def test_claims_name_the_comparisons_that_fail():
    from pipeline.reporting.report import claims_table

    found = claims_table(seed_mean_table(FAIL, EARLY["fail"]), CLAIM_CHAINS).set_index(
        ["claim", "comparison", "metric"])
    failed = found[found.verdict == "does not hold"]
    assert set(failed.index.droplevel(2)) == {
        ("above_random_init", "supervised vs random_init"), ("above_pixels", "mae vs pixels"),
        ("above_pixels", "bootmae vs pixels"), ("above_pixels", "supervised vs pixels"),
        ("dbot_stage_gain", "dbot_mae_stage1 vs dbot_mae_stage0"),
        ("teacher_spread_shrinks", "spread across teachers, stage 0 vs teachers"),
        ("teacher_spread_shrinks", "spread across teachers, stage 1 vs stage 0"),
        ("beats_mae", "bootmae vs mae"), ("rcmae_early_knn", "rcmae vs mae")}
    row = found.loc[("above_pixels", "mae vs pixels", "knn/top1")]
    assert (row.value, row.reference, row.delta) == pytest.approx((0.35, 0.40, -0.05))
    spread = found.loc[("teacher_spread_shrinks", "spread across teachers, stage 1 vs stage 0",
                        "knn/top1 std across teachers")]
    assert (spread.value, spread.reference) == pytest.approx((0.15 / 2 ** 0.5, 0.07 / 2 ** 0.5))
    assert (found.loc[("rcmae_early_knn", "rcmae vs mae", "pretrain/early_online_knn_top1"), "delta"]
            == pytest.approx(-0.1))


def test_verdict_sign_and_spread():
    from pipeline.reporting.claims import FAILS, HOLDS, overall, verdict
    from pipeline.reporting.claims import SPREAD as WITHIN

    nan = float("nan")
    assert [verdict(0.0, nan, s) for s in (">", ">=", "<")] == [FAILS, HOLDS, FAILS]     # equal: only ">=" holds
    assert [verdict(0.03, 0.02, ">"), verdict(-0.03, 0.02, ">"), verdict(-0.02, 0.02, ">")] == [HOLDS, FAILS, WITHIN]
    assert [verdict(-0.03, 0.02, "<"), verdict(0.01, 0.02, "<")] == [HOLDS, WITHIN]
    assert overall([HOLDS, WITHIN]) == WITHIN and overall([WITHIN, FAILS]) == FAILS and overall([]) == "not tested"


def test_early_online_knn_is_the_mean_over_the_first_half_of_the_epochs(tmp_path):
    from pipeline.reporting.report import pretrain_rows

    doc = _pretrain_doc("rcmae", "rcmae", 0)                       # 4 epochs: the first half is epochs 0, 1
    for e, knn in zip(doc["epochs"], (0.1, 0.2, 0.6, 0.8)):
        e["online_knn_top1"] = knn
    rows = {r["metric"]: r["value"] for r in pretrain_rows(doc, tmp_path / "m.json")}
    assert rows["early_online_knn_top1"] == pytest.approx(0.15)
    doc["epochs"].append(dict(doc["epochs"][-1], epoch=4))         # 5 epochs: ceil(5 / 2) = 3 -> epochs 0, 1, 2
    assert ({r["metric"]: r["value"] for r in pretrain_rows(doc, tmp_path / "m.json")}["early_online_knn_top1"]
            == pytest.approx(0.3))
    del doc["epochs"][0]["online_knn_top1"], doc["epochs"][1]["online_knn_top1"], doc["epochs"][2]["online_knn_top1"]
    assert "early_online_knn_top1" not in {r["metric"] for r in pretrain_rows(doc, tmp_path / "m.json")}
