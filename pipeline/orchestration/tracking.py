"""MLflow adapter: one experiment per study, a parent run per method chain and seed, a child run per node.

Only this module talks to MLflow. Runs are made through MlflowClient (no global "active run"), so a
resumed node continues its own run by id instead of starting a duplicate. Default store: a local
SQLite file (sqlite:///mlflow.db, git-ignored); params `tracking.uri` or $MLFLOW_TRACKING_URI point
elsewhere, e.g. an `mlflow server` when many cluster jobs log at once.

What the MLflow UI reads is logged in its own keys: the experiment tag `mlflow.experimentKind` (its training
view), on every run `mlflow.source.git.commit`, `mlflow.source.name` (the node's module), `mlflow.source.type` and
`mlflow.user`; the prepared dataset as a run input (log_input: a MetaDataset whose digest is the pipeline's
dataset hash, for every node that reads it, see DATA_CONTEXT); system metrics (`system/...`) of the training
nodes; and on each chain's parent run the k-NN and linear-probe accuracy of its stages (step = stage), so a
parent's chart follows the chain.

Every client call goes through `_retry`: a busy store (SQLite "database is locked", a server's 429/5xx or a
dropped connection) is retried with backoff for up to RETRY_BUDGET_S seconds instead of failing the node.
"""
from __future__ import annotations

import fcntl
import functools
import getpass
import itertools
import json
import logging
import os
import platform
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from pipeline import layout
from pipeline.config import section_hash, tracking_uri
from pipeline.dag import stage_module
from pipeline.layout import RESULTS
from pipeline.orchestration.cli import write_params

PACKAGES = ("torch", "timm", "mlflow", "snakemake", "dvc", "submitit", "pandas")
RETRY_BUDGET_S = 60.0        # longest a node waits, in all, for a busy store before the error reaches it
retries = 0                  # transient store errors retried in this process (logged; the tests report it)
_TRANSIENT_TEXT = ("database is locked", "database table is locked", "max retries exceeded", "connection refused",
                   "connection reset", "connection aborted", "remotedisconnected", "timeout exception")
log = logging.getLogger(__name__)

# The UI's kind of an experiment (mlflow.experimentKind): its "Machine learning" view, which lists training runs.
# MLflow 3.17's UI only reads it when its workflow switch is off; with the switch (the default) the view follows
# the URL's ?workflowType=machine_learning or the switch's choice stored in the browser (docs/snakemake-dvc-mlflow.md).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_QUERY = "workflowType=machine_learning"     # <ui>/#/experiments/<id>?UI_QUERY opens the runs table in 3.17+
TRAINING_NODES = ("pretrain", "pretrain_dbot", "supervised")      # nodes with MLflow system metrics
# nodes that read the prepared dataset -> the run input's context (mlflow.data.context)
DATA_CONTEXT = {**dict.fromkeys(TRAINING_NODES, "training"),
                **dict.fromkeys(("knn", "linprobe", "finetune", "segprobe", "robustness", "analyze", "cka",
                                 "checkpoint_eval"), "evaluation")}
# seconds between system-metric samples (MLflow's $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it); a node
# shorter than this logs none, and the sampling thread wakes at most this often (cheap next to training)
SYSTEM_METRICS_INTERVAL_S = 10.0


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}: MLflow params are flat strings."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: str(v)})
    return out


def node_name(node_id: str) -> str:
    """'pretrain@seed0-mae' -> 'pretrain' (node ids: pipeline.layout)."""
    return node_id.split("@")[0]


def source_name(node_id: str) -> str:
    """The module of a node (mlflow.source.name, pipeline.dag.stage_module), e.g.
    pipeline.stages.training.pretrain; for a name that is no node, the program that runs."""
    try:
        return stage_module(node_name(node_id))
    except KeyError:
        pass
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec else Path(sys.argv[0]).name or "python"


def environment_tags() -> dict[str, str]:
    """Git commit (mlflow.source.git.commit; git_dirty: tracked files differ from it), how the node runs
    (mlflow.source.type: JOB in a Slurm job, else LOCAL), user, host, package versions: what a reader needs to
    reproduce a run."""
    tags = {"mlflow.source.type": "JOB" if os.environ.get("SLURM_JOB_ID") else "LOCAL"}
    try:
        tags["mlflow.source.git.commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                          text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        tags["git_dirty"] = "true" if dirty else "false"
    except (OSError, subprocess.CalledProcessError):
        tags["git_dirty"] = "unknown"                 # no git, or not a repository: no commit tag
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    tags.update(host=platform.node(), python=platform.python_version())
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


def _transient(e: BaseException) -> bool:
    """Store contention or a flaky connection, worth retrying: the SQL store's OperationalError (MLflow makes it
    TEMPORARILY_UNAVAILABLE, HTTP 503), a server's 429/503/504, MLflow's own HTTP retries running out (on 5xx or
    a refused or dropped connection). Anything else (a bad param, a missing run, a full disk) is a real error."""
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    if isinstance(e, (sqlalchemy.exc.OperationalError, requests.ConnectionError, requests.Timeout)):
        return True
    return isinstance(e, MlflowException) and (
        e.get_http_status_code() in (429, 503, 504) or any(t in str(e).lower() for t in _TRANSIENT_TEXT))


def _retry(call, *args, **kwargs):
    """call(*args, **kwargs), retried on transient store errors with exponential backoff and jitter (no attempt
    starts later than RETRY_BUDGET_S after the first); other errors, and the last one when the budget is spent,
    propagate unchanged.

    Safe to repeat: a failed SQL transaction is rolled back, and re-sending the same params, tags, status or
    metric (same timestamp and step) is a no-op in MLflow's stores. Over HTTP, a create_run whose reply was lost
    could leave an extra run; create_experiment's duplicate is handled in NodeRun._experiment."""
    global retries
    deadline = time.monotonic() + RETRY_BUDGET_S
    for attempt in itertools.count():
        try:
            return call(*args, **kwargs)
        except Exception as e:
            delay = min(0.05 * 2 ** attempt, 5.0) * random.uniform(0.5, 1.5)
            if not _transient(e) or time.monotonic() + delay > deadline:
                raise
            retries += 1
            log.warning("MLflow store busy (%s): %s again in %.2f s (retry %d)", str(e).splitlines()[0][:200],
                        getattr(call, "__name__", call), delay, attempt + 1)
            time.sleep(delay)


class _RetryingClient:
    """An MlflowClient whose every method call goes through _retry."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        return functools.partial(_retry, attr) if callable(attr) else attr


@contextmanager
def _store_lock():
    """Serialise experiment/parent creation between processes sharing this results folder.

    That covers one machine (flock on a local disk). Jobs on several machines, logging to one server, do not
    share it: there the store's unique experiment names settle create_experiment (see _experiment) and _parent
    looks again after making a parent."""
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

        uri = tracking_uri(params)
        if uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (seconds of import: not under the lock)
        self._env = environment_tags()          # git and package look-ups: outside the lock
        with _store_lock():
            self.client = _RetryingClient(_retry(MlflowClient, uri))    # opens the store, makes its tables if new
            self.experiment_id = self._experiment(params["study"])
            seed = str(params.get("seed", "all"))          # "all": nodes of the whole study (data, report)
            self.parent_id = self._parent(chain, seed)
        self.uri = uri
        self._monitor = None
        if run_id is None:
            tags = {**self._env, "mlflow.source.name": source_name(node_id),
                    **{k: str(v) for k, v in tags.items()},
                    "mlflow.parentRunId": self.parent_id, "chain": chain, "node": node_id, "seed": seed}
            run_id = self.client.create_run(self.experiment_id, run_name=node_id, tags=tags).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        key, kind = EXPERIMENT_KIND
        exp = self.client.get_experiment_by_name(name)
        if exp:
            if key not in exp.tags:          # made before the tag was set (a kind someone chose stays)
                self.client.set_experiment_tag(exp.experiment_id, key, kind)
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, tags={key: kind})     # the UI's training view
        except MlflowException as e:          # another machine made it first (the name is unique in the store)
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    def _parent(self, chain: str, seed: str) -> str:
        """The oldest chain run of (chain, seed), made if there is none.

        Without the shared lock (jobs on several machines) two jobs may both find none and both make one; each
        then looks again and takes the oldest, and so does every later node. Only jobs racing within moments
        can still end up under different parents (start times are client clocks); then an extra chain run
        stays. Nothing is deleted: another job may already have taken the run that lost."""
        def oldest() -> str | None:
            runs = self.client.search_runs(
                [self.experiment_id], f"tags.chain = '{chain}' and tags.seed = '{seed}' and tags.role = 'chain'",
                max_results=1, order_by=["attributes.start_time ASC"])      # ties: by run id, in every store
            return runs[0].info.run_id if runs else None

        if found := oldest():
            return found
        name = chain if seed == "all" else f"{chain} seed{seed}"
        tags = {**self._env, "mlflow.source.name": "pipeline", "chain": chain, "seed": seed, "role": "chain"}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return oldest()

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

    def log_chain_metrics(self, metrics: dict, step: int) -> None:
        """Metrics of this node on its chain's parent run at step `step` (the chain's stage), so the parent's
        chart shows them across the chain."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_dataset(self, params: dict, context: str) -> bool:
        """The prepared dataset (layout.dataset_path) as an input of this run (the UI's Dataset column): a
        MetaDataset, no pixels read; name: data.dataset and image size; digest: the first 36 characters of the
        dataset hash of its sidecar (36: the SQL stores' digest column), the whole hash in the input tag
        dataset_hash; source: the artefact's path. False (nothing logged) when the dataset has no sidecar yet."""
        from mlflow.data.dataset_source_registry import get_dataset_source_from_json
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        path = layout.dataset_path(params)
        try:
            digest = json.loads(layout.sidecar(path).read_text())["dataset_hash"]
        except (OSError, ValueError, KeyError):
            return False
        source = get_dataset_source_from_json(json.dumps({"uri": str(path.resolve())}), "local")
        d = params["data"]
        dataset = MetaDataset(source, name=f"{d['dataset']} {d['img_size']}px", digest=digest[:36])
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("dataset_hash", digest)]
        self.client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(), tags)])
        return True

    def start_system_metrics(self, resume: bool = False) -> None:
        """MLflow's system metrics (system/cpu_utilization_percentage, memory, disk, network, GPU where there is
        one) of this run, sampled every SYSTEM_METRICS_INTERVAL_S seconds by a daemon thread until finish();
        resume continues a continued run's steps. A monitor that cannot start is logged, never fatal."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                           resume_logging=resume, tracking_uri=self.uri)
            monitor.start()
        except Exception as e:                     # e.g. psutil missing: the node runs without system metrics
            log.warning("no system metrics for run %s: %s", self.run_id, e)
            return
        self._monitor = monitor

    def stop_system_metrics(self) -> None:
        """Stop the sampling thread (it wakes at once) and log what it holds."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    def log_artifacts(self, *paths: Path | str) -> None:
        for p in paths:
            if Path(p).is_file():
                self.client.log_artifact(self.run_id, str(p))

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def finish(self, ok: bool = True) -> None:
        try:
            self.stop_system_metrics()
        finally:
            self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


@contextmanager
def tracked(params: dict, chain: str, node_id: str, out_dir: Path, sections: list[str],
            tags: dict | None = None, run_id: str | None = None):
    """Start (or continue) the node's child run, log its params, write out_dir/params.yaml, yield the run.

    A node that reads the prepared dataset (DATA_CONTEXT) logs it as the run's input; prepare_data logs the
    dataset it wrote when its block ends. A training node (TRAINING_NODES) records system metrics while the
    block runs. The run ends FINISHED when the block completes and FAILED when it raises; either way the
    system-metrics thread stops.
    """
    run = NodeRun(params, chain, node_id, dict(tags or {}, params_hash=section_hash(params, sections)), run_id)
    node = node_name(node_id)
    try:
        run.log_params({s: params[s] for s in sections})
        write_params(Path(out_dir) / "params.yaml", params, sections)
        if node in DATA_CONTEXT:
            run.log_dataset(params, DATA_CONTEXT[node])
        if node in TRAINING_NODES:
            run.start_system_metrics(resume=run_id is not None)
        yield run
        run.log_artifacts(Path(out_dir) / "params.yaml")
        if node == "prepare_data":
            run.log_dataset(params, "prepared")
    except BaseException:
        run.finish(ok=False)
        raise
    run.finish(ok=True)
