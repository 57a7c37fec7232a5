"""The tiny study end to end through real Snakemake, MLflow's SQLite store, and a no-op rerun."""
import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli

pytestmark = pytest.mark.e2e


def test_tiny_study_builds_tracks_and_reruns_nothing(workdir):
    run_cli("snakemake", "--cores", "2", "--config", "preset=tiny")
    table = pd.read_csv("results/summary.csv")
    assert {"method", "stage", "weights", "protocol", "metric", "value"} <= set(table.columns)
    weights = {"random_init", "mae", "sdae", "rcmae", "bootmae", "supervised", "dbot_stage0", "dbot_stage1",
               "dbot_stage2"}
    for protocol in ("knn", "linprobe"):
        rows = table[(table.protocol == protocol) & (table.metric == "top1")]
        assert set(rows.weights) == weights and rows.value.between(0, 1).all()
    analysis = json.loads((workdir / "results/analyze/dbot_stage1/analysis.json").read_text())
    assert len(analysis["attention_distance"]) == 2 and len(analysis["attention_distance"][0]) == 2  # depth x heads
    assert all(0 < s <= 1 for s in analysis["singular_value_share"])
    cka = json.loads((workdir / "results/cka/cka.json").read_text())
    assert len(cka["pairs"]) == 8 * 7 // 2 and all(0 <= v <= 1 + 1e-6 for v in cka["pairs"]["mae vs sdae"])
    for png in ("pretrain_loss", "chain_accuracy", "accuracy_vs_compute", "attention_distance", "singular_value_share"):
        assert (workdir / "results" / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    knn = json.loads((workdir / "results/knn/dbot_stage1/metrics.json").read_text())
    assert knn["settings"] == {"k": 20, "temperature": 0.07, "feature": "cls"}
    assert knn["weights"]["evaluated"] == "student" and len(knn["weights"]["sha256"]) == 64
    rcmae = json.loads((workdir / "results/linprobe/rcmae/metrics.json").read_text())
    assert rcmae["weights"]["evaluated"] == "teacher"                 # rcmae.evaluate_weights, recorded
    swap = json.loads((workdir / "results/teacher_swap/stage1/teacher.json").read_text())
    assert swap["source"] == "results/pretrain_dbot/stage0/encoder.safetensors" and swap["source_node"] == "pretrain_dbot"
    assert (workdir / "results/benchmarks/pretrain/mae.tsv").is_file()
    flops = table[(table.protocol == "pretrain") & (table.metric == "train_flops")].set_index("weights").value
    assert flops["bootmae"] > flops["mae"] > 0 and flops["dbot_stage0"] > 0   # compute accounting per node
    assert not (workdir / "results/.resume/pretrain@mae").exists()

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = {r.data.tags["chain"]: r.info.run_id for r in runs if r.data.tags.get("role") == "chain"}
    assert {"mae", "sdae", "rcmae", "bootmae", "dbot", "random_init"} <= set(parents)
    dbot_children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents["dbot"]}
    assert {"pretrain_dbot@stage0", "teacher_swap@stage2", "knn@dbot_stage2", "linprobe@dbot_stage1"} <= dbot_children
    stage2 = next(r for r in runs if r.info.run_name == "pretrain_dbot@stage2")
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
