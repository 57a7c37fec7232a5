"""The tiny study end to end through real Snakemake, MLflow's SQLite store, and a no-op rerun."""
import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli

pytestmark = pytest.mark.e2e


def test_tiny_study_builds_tracks_and_reruns_nothing(workdir):
    run_cli("snakemake", "--cores", "2", "--config", "preset=tiny", timeout=1800)   # ~80 short processes
    table = pd.read_csv("results/summary.csv")
    assert {"method", "stage", "weights", "protocol", "metric", "value"} <= set(table.columns)
    chains = ("random", "mae", "supervised")                        # params dbot.chains: the teacher-swap study
    weights = {"random_init", "mae", "sdae", "rcmae", "bootmae", "supervised"} | {
        f"dbot_{c}_stage{k}" for c in chains for k in range(3)}
    for protocol in ("knn", "linprobe"):
        rows = table[(table.protocol == protocol) & (table.metric == "top1")]
        assert set(rows.weights) == weights and rows.value.between(0, 1).all()
    analysis = json.loads((workdir / "results/seed0/analyze/dbot_random_stage1/analysis.json").read_text())
    assert len(analysis["attention_distance"]) == 2 and len(analysis["attention_distance"][0]) == 2  # depth x heads
    assert all(0 < s <= 1 for s in analysis["singular_value_share"])
    cka = json.loads((workdir / "results/seed0/cka/cka.json").read_text())
    # first chain's consecutive stages (2) + 5 trained encoders vs its last stage + 3 chain pairs x (teachers + 3 stages)
    assert len(cka["pairs"]) == 2 + 5 + 3 * 4 and set(cka["swap"]) == {"teacher", "0", "1", "2"}
    assert all(0 <= v <= 1 + 1e-6 for v in cka["pairs"]["dbot_mae_stage2 vs dbot_supervised_stage2"])
    spread = pd.read_csv("results/swap_spread.csv")
    assert set(spread.stage) == {"teacher", "0", "1", "2"} and (spread.chains == 3).all()
    assert "## Teacher-swap study" in (workdir / "results/summary.md").read_text()
    for png in ("pretrain_loss", "chain_accuracy", "accuracy_vs_compute", "attention_distance", "singular_value_share",
                "swap_study"):
        assert (workdir / "results" / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    knn = json.loads((workdir / "results/seed0/knn/dbot_random_stage1/metrics.json").read_text())
    assert knn["settings"] == {"k": 20, "temperature": 0.07, "feature": "cls", "bf16": True}
    assert knn["weights"]["evaluated"] == "student" and len(knn["weights"]["sha256"]) == 64
    rcmae = json.loads((workdir / "results/seed0/linprobe/rcmae/metrics.json").read_text())
    assert rcmae["weights"]["evaluated"] == "teacher"                 # rcmae.evaluate_weights, recorded
    swap = json.loads((workdir / "results/seed0/teacher_swap/mae_stage1/teacher.json").read_text())
    assert swap["source"] == "results/seed0/pretrain_dbot/mae_stage0/encoder.safetensors" and swap["source_node"] == "pretrain_dbot"
    swap = json.loads((workdir / "results/seed0/teacher_swap/supervised_stage0/teacher.json").read_text())
    assert swap["source"] == "results/seed0/supervised/encoder.safetensors" and swap["source_method"] == "supervised"
    assert (workdir / "results/seed0/benchmarks/pretrain/mae.tsv").is_file()
    flops = table[(table.protocol == "pretrain") & (table.metric == "train_flops")].set_index("weights").value
    assert flops["bootmae"] > flops["mae"] > 0 and flops["dbot_random_stage0"] > 0   # compute accounting per node
    assert not (workdir / "results/.resume/pretrain@seed0-mae").exists()

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = {r.data.tags["chain"]: r.info.run_id for r in runs if r.data.tags.get("role") == "chain"}
    assert {"mae", "sdae", "rcmae", "bootmae", "random_init"} | {f"dbot_{c}" for c in chains} <= set(parents)
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents["dbot_mae"]}
    assert {"teacher_swap@seed0-mae_stage0", "pretrain_dbot@seed0-mae_stage0", "teacher_swap@seed0-mae_stage2",
            "knn@seed0-dbot_mae_stage2", "linprobe@seed0-dbot_mae_stage1"} <= children
    stage2 = next(r for r in runs if r.info.run_name == "pretrain_dbot@seed0-random_stage2")
    assert stage2.data.params["pretrain.mask_ratio"] == "0.75" and "dataset_hash" in stage2.data.tags
    assert len(client.get_metric_history(stage2.info.run_id, "loss")) == 1

    again = run_cli("snakemake", "--cores", "2", "--config", "preset=tiny")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_bad_params_stop_snakemake_before_any_job(workdir):
    proc = run_cli("snakemake", "--cores", "1", "--config", "preset=tiny", "--dry-run", check=False)
    assert proc.returncode == 0
    (workdir / "params/presets/broken.yaml").write_text("pretrain: {mask_ratio: 1.2}\n")
    proc = run_cli("snakemake", "--cores", "1", "--config", "preset=broken", check=False)
    assert proc.returncode != 0
    assert "pretrain.mask_ratio: 1.2 is greater than or equal to the maximum of 1" in proc.stderr
    assert not (workdir / "results/prepare_data").exists()
