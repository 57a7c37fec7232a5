"""MLflow adapter against a real SQLite store: experiment per study, parent per chain, child per node."""
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import config, layout
from pipeline.orchestration import tracking
from pipeline.orchestration.tracking import NodeRun, environment_tags, flatten, tracked
from pipeline.stages.evaluation.common import log_on_chain


@pytest.fixture
def params(workdir):
    return config.load("tiny")


def test_parent_per_chain_child_per_node_and_continuation(params, workdir):
    a = NodeRun(params, "dbot", "pretrain_dbot@stage0", {"stage": 0})
    a.log_params({"pretrain": params["pretrain"]})
    a.log_metrics({"loss": 1.0}, step=0)
    a.finish()
    b = NodeRun(params, "dbot", "pretrain_dbot@stage1", {"stage": 1})
    b.finish()
    c = NodeRun(params, "mae", "pretrain@mae", {})
    resumed = NodeRun(params, "dbot", "pretrain_dbot@stage0", {}, run_id=a.run_id)
    resumed.log_params({"pretrain": params["pretrain"]})          # same values again: no error
    resumed.log_metrics({"loss": 0.5}, step=1)
    resumed.finish()
    client = MlflowClient(config.tracking_uri(params))
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = {r.data.tags["chain"]: r.info.run_id for r in runs if r.data.tags.get("role") == "chain"}
    assert set(parents) == {"dbot", "mae"}
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3                                      # the resume did not duplicate
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == set(parents.values())
    history = client.get_metric_history(a.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5)]
    run = client.get_run(a.run_id)
    assert run.data.params["pretrain.epochs"] == "2" and "git_dirty" in run.data.tags
    assert "version.torch" in run.data.tags and run.data.tags["seed"] == "0"
    assert c.run_id != a.run_id


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1]}) == {"a.b": "1", "a.c.d": "None", "e": "[1]"}


# --- what the MLflow UI reads (issue 18, item 5) ---
REPO = Path(__file__).resolve().parents[1]
HASH = "0123456789abcdef" * 4


def prepared(params, digest: str = HASH) -> Path:
    """A stand-in for prepare_data's sidecar (only its dataset_hash is read): the dataset the nodes log."""
    path = layout.sidecar(layout.dataset_path(params))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset_hash": digest}))
    return layout.dataset_path(params)


def test_experiment_kind_and_source_tags(params, workdir):
    client = MlflowClient(config.tracking_uri(params))
    client.create_experiment("tiny")                     # an experiment made before the kind tag
    train = NodeRun(params, "dbot_mae", "pretrain_dbot@seed0-mae_stage1", {})
    knn = NodeRun(params, "dbot_mae", "knn@seed0-dbot_mae_stage1", {})
    other = NodeRun(params, "mae", "node0@seed0-mae", {})
    assert client.get_experiment_by_name("tiny").tags["mlflow.experimentKind"] == "custom_model_development"
    tags = {r.run_id: client.get_run(r.run_id).data.tags for r in (train, knn, other)}
    assert tags[train.run_id]["mlflow.source.name"] == "pipeline.stages.training.pretrain_dbot"
    assert tags[knn.run_id]["mlflow.source.name"] == "pipeline.stages.evaluation.knn"
    assert tags[other.run_id]["mlflow.source.name"]                # no node module: the program's name
    parent = client.get_run(train.parent_id).data.tags
    for t in (*tags.values(), parent):
        assert t["mlflow.source.type"] == "LOCAL" and t["mlflow.user"] and "git_revision" not in t
    assert parent["mlflow.source.name"] == "pipeline" and parent["role"] == "chain"
    client.set_experiment_tag(train.experiment_id, "mlflow.experimentKind", "finetuning")
    NodeRun(params, "mae", "node1@seed0-mae", {})                  # a kind someone chose stays
    assert client.get_experiment_by_name("tiny").tags["mlflow.experimentKind"] == "finetuning"


def test_git_commit_tag(monkeypatch):
    monkeypatch.chdir(REPO)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    tags = environment_tags()
    assert tags["mlflow.source.git.commit"] == head and tags["git_dirty"] in ("true", "false")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert environment_tags()["mlflow.source.type"] == "JOB"


def test_prepared_dataset_is_each_readers_input(params, workdir):
    path = prepared(params)
    out = workdir / "results/seed0/knn/dbot_mae_stage1"
    with tracked(params, "dbot_mae", "knn@seed0-dbot_mae_stage1", out, ["seed"]) as run:
        pass
    with tracked(params, "dbot_mae", "knn@seed0-dbot_mae_stage1", out, ["seed"], run_id=run.run_id):
        pass                                                        # a continued run: the input once
    with tracked(params, "report", "report", workdir / "results", ["seed"]) as report:
        pass                                                        # reads no dataset
    client = MlflowClient(config.tracking_uri(params))
    inputs = client.get_run(run.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds, tags = inputs[0].dataset, {t.key: t.value for t in inputs[0].tags}
    assert ds.digest == HASH[:36] and ds.source_type == "local"
    assert json.loads(ds.source)["uri"] == str(path.resolve())
    assert ds.name == f"{params['data']['dataset']} {params['data']['img_size']}px"
    assert tags == {"mlflow.data.context": "evaluation", "dataset_hash": HASH}
    assert client.get_run(report.run_id).inputs.dataset_inputs == []


def test_chain_parent_holds_each_stages_accuracy(params, workdir):
    runs = {}
    for weights in ("dbot_mae_stage0", "dbot_mae_stage1", "dbot_mae_stage2", "mae"):
        chain = layout.describe_weights(weights)["chain"]
        for protocol, top1 in (("knn", 0.1), ("linprobe", 0.2)):
            run = runs[weights, protocol] = NodeRun(params, chain, f"{protocol}@seed0-{weights}", {})
            stage = layout.describe_weights(weights)["stage"]
            log_on_chain(run, protocol, weights, {"top1": top1 + stage / 10, "top5": 0.9})
    client = MlflowClient(config.tracking_uri(params))
    dbot, mae = runs["dbot_mae_stage0", "knn"].parent_id, runs["mae", "knn"].parent_id
    assert {r.parent_id for (w, _), r in runs.items() if w.startswith("dbot")} == {dbot}
    knn = [(m.step, round(m.value, 3)) for m in client.get_metric_history(dbot, "knn_top1")]
    assert sorted(knn) == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert sorted(m.step for m in client.get_metric_history(dbot, "linprobe_top1")) == [0, 1, 2]
    assert [(m.step, m.value) for m in client.get_metric_history(mae, "linprobe_top1")] == [(0, 0.2)]
    assert set(client.get_run(mae).data.metrics) == {"knn_top1", "knn_top5", "linprobe_top1", "linprobe_top5"}


def monitors() -> list:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


def test_system_metrics_of_training_nodes_stop_with_the_node(params, workdir, monkeypatch):
    monkeypatch.setattr(tracking, "SYSTEM_METRICS_INTERVAL_S", 0.1)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", raising=False)
    prepared(params)
    out = workdir / "results/seed0/pretrain/mae"
    with tracked(params, "mae", "pretrain@seed0-mae", out, ["seed"]) as run:
        assert len(monitors()) == 1
        time.sleep(0.6)
    assert monitors() == []
    with pytest.raises(RuntimeError), tracked(params, "mae", "pretrain@seed0-sdae", out, ["seed"]) as failed:
        raise RuntimeError("node fails")
    assert monitors() == []
    with tracked(params, "mae", "knn@seed0-mae", out, ["seed"]):
        assert monitors() == []                                     # evaluation nodes: none
    client = MlflowClient(config.tracking_uri(params))
    metrics = client.get_run(run.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    tags = {t.key: t.value for t in client.get_run(run.run_id).inputs.dataset_inputs[0].tags}
    assert tags["mlflow.data.context"] == "training"
    assert client.get_run(failed.run_id).info.status == "FAILED"


def test_mlflow_ui_opens_training_runs_and_charts_the_chain(params, workdir):
    """A real `mlflow ui` on the store, in headless Chromium: the experiment's link opens its runs table (not the
    GenAI overview), the node run shows its dataset, and the chain's parent charts knn_top1 over the stages."""
    from browser import browser_page, chromium, mlflow_ui

    chromium()                                                      # skip before building anything
    prepared(params)
    for stage in (0, 1, 2):
        weights = f"dbot_mae_stage{stage}"
        with tracked(params, "dbot_mae", f"knn@seed0-{weights}", workdir / f"results/seed0/knn/{weights}",
                     ["seed"]) as run:
            log_on_chain(run, "knn", weights, {"top1": 0.25 + stage / 10})
    client = MlflowClient(config.tracking_uri(params))
    experiment = client.get_experiment_by_name("tiny").experiment_id
    dataset = client.get_run(run.run_id).inputs.dataset_inputs[0].dataset.name
    with mlflow_ui(workdir / "mlflow.db") as url, browser_page() as page:
        page.goto(f"{url}/#/experiments/{experiment}?{tracking.UI_QUERY}", timeout=60000)
        page.wait_for_selector("text=dbot_mae seed0", timeout=60000)
        assert f"/experiments/{experiment}/runs" in page.url and "overview" not in page.url
        page.locator("[role=row]", has_text="dbot_mae seed0").first.locator("button").first.click()   # expand
        page.get_by_text("knn@seed0-dbot_mae_stage2", exact=True).wait_for(timeout=30000)
        page.get_by_text(dataset, exact=False).first.wait_for(timeout=30000)     # the Dataset column
        page.goto(f"{url}/#/experiments/{experiment}/runs/{run.parent_id}/model-metrics?{tracking.UI_QUERY}")
        page.get_by_text("knn_top1", exact=True).first.wait_for(timeout=60000)       # the chart's title
        page.locator(".js-plotly-plot .scatterlayer .point").nth(2).wait_for(timeout=60000)
        assert page.locator(".js-plotly-plot .scatterlayer .point").count() == 3      # one point per stage
        assert "Step" in page.inner_text(".js-plotly-plot")
