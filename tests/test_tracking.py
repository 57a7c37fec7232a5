"""MLflow adapter against a real SQLite store: experiment per study, parent per chain, child per node."""
import pytest
from mlflow.tracking import MlflowClient

from pipeline import config
from pipeline.orchestration.tracking import NodeRun, flatten


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
    assert run.data.params["pretrain.epochs"] == "2" and "git_revision" in run.data.tags
    assert "version.torch" in run.data.tags and run.data.tags["seed"] == "0"
    assert c.run_id != a.run_id


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1]}) == {"a.b": "1", "a.c.d": "None", "e": "[1]"}
