"""MLflow adapter: one experiment per study, a parent run per method chain and seed, a child run per node.

Only this module talks to MLflow. Runs are made through MlflowClient (no global "active run"), so a
resumed node continues its own run by id instead of starting a duplicate. Default store: a local
SQLite file (sqlite:///mlflow.db, git-ignored); params `tracking.uri` or $MLFLOW_TRACKING_URI point
elsewhere, e.g. an `mlflow server` when many cluster jobs log at once.
"""
from __future__ import annotations

import fcntl
import platform
import subprocess
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from pipeline.config import tracking_uri
from pipeline.layout import RESULTS

PACKAGES = ("torch", "timm", "mlflow", "snakemake", "dvc", "submitit", "pandas")


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}: MLflow params are flat strings."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: str(v)})
    return out


def environment_tags() -> dict[str, str]:
    """Git revision (with -dirty), package versions and host: what a reader needs to reproduce a run."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        rev += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    tags = {"git_revision": rev, "host": platform.node(), "python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


@contextmanager
def _store_lock():
    """Serialise experiment/parent creation between processes sharing this results folder."""
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / ".mlflow.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class NodeRun:
    """The child MLflow run of one DAG node, nested under its chain's parent run."""

    def __init__(self, params: dict, chain: str, node_id: str, tags: dict, run_id: str | None = None):
        from mlflow.tracking import MlflowClient

        with _store_lock():
            self.client = MlflowClient(tracking_uri(params))
            exp = self.client.get_experiment_by_name(params["study"])
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
                params["study"], tags={"mlflow.experimentKind": "custom_model_development"})   # the UI's training view
            seed = str(params.get("seed", "all"))          # "all": nodes of the whole study (data, report)
            parent = self._parent(chain, seed)
        if run_id is None:
            tags = {**environment_tags(), **{k: str(v) for k, v in tags.items()},
                    "mlflow.parentRunId": parent, "chain": chain, "node": node_id, "seed": seed}
            run_id = self.client.create_run(self.experiment_id, run_name=node_id, tags=tags).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def _parent(self, chain: str, seed: str) -> str:
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.chain = '{chain}' and tags.seed = '{seed}' and tags.role = 'chain'",
            max_results=1)
        if runs:
            return runs[0].info.run_id
        name = chain if seed == "all" else f"{chain} seed{seed}"
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"chain": chain, "seed": seed, "role": "chain"})
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        items = [Param(k, v[:6000]) for k, v in flatten(params).items() if k not in have]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=items)

    def log_artifacts(self, *paths: Path | str) -> None:
        for p in paths:
            if Path(p).is_file():
                self.client.log_artifact(self.run_id, str(p))

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def finish(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
