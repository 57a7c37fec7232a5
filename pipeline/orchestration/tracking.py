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

Every client call goes through `_retry`: a busy store (SQLite "database is locked", a server's 429) is retried with
backoff for up to RETRY_BUDGET_S seconds, one that does not answer (503/504, a refused or dropped connection, a
time-out) for up to UNREACHABLE_BUDGET_S ($MIM_TRACKING_RETRY_S sets both); MLflow's own HTTP retries and
time-out are bounded by HTTP_DEFAULTS (unless the environment sets them), so a store that is down costs a node
seconds, not minutes.

Tracking is never on the critical path. When the store still fails after that, the node goes on without it: it
prints one warning line (which store, what failed, how to sync) and from then on writes what it would have logged
(the run's creation, params, metrics with their steps and times, tags, dataset inputs, copies of its artefacts,
its end) to a journal, results/.tracking/<node id>.jsonl (+ <node id>.files/), which no DAG tool declares. A run
made offline gets a placeholder id (`offline-...`, kept in a training node's resumable state like a real id).
Journals are replayed (`replay`) in their order by `python -m pipeline.orchestration.tracking sync`, by every later
node whose store answers (when its run opens), and by the node itself at its end if the store answers again: the
run is made with its recorded start time (a run made before by an interrupted sync is found again by node and
start time, never duplicated), under its chain's parent, and everything else is idempotent in MLflow's stores, so
the store ends as it would have without the outage. Not replayed: the system metrics sampled while the store was
down (a sample of the machine, not a result). Ids of runs made by a sync: results/.tracking/ids.json.
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
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from pipeline import layout
from pipeline.config import section_hash, tracking_uri
from pipeline.dag import stage_module
from pipeline.layout import RESULTS
from pipeline.orchestration.cli import write_params

PACKAGES = ("torch", "timm", "mlflow", "snakemake", "dvc", "submitit", "pandas")
RETRY_BUDGET_S = 60.0        # longest a node waits, in all, for a busy store before it goes on without it
UNREACHABLE_BUDGET_S = 15.0  # ... and for a store that does not answer ($MIM_TRACKING_RETRY_S: both budgets)
# MLflow's own HTTP retries (default 7, about 4 minutes on a refused connection) and time-out (120 s), unless set
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
JOURNALS = RESULTS / ".tracking"     # what nodes could not log: <node id>.jsonl, <node id>.files/, ids.json
OFFLINE = "offline-"                 # prefix of the placeholder id of a run made while the store was down
retries = 0                  # transient store errors retried in this process (logged; the tests report it)
_TRANSIENT_TEXT = ("database is locked", "database table is locked", "max retries exceeded", "connection refused",
                   "connection reset", "connection aborted", "remotedisconnected", "timeout exception")
_BUSY_TEXT = ("database is locked", "database table is locked")
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


def _budget(e: BaseException) -> float:
    """Seconds of retries for this transient error: RETRY_BUDGET_S for a busy store (it answers: it will take the
    write), UNREACHABLE_BUDGET_S for one that does not answer; $MIM_TRACKING_RETRY_S overrides both."""
    if os.environ.get("MIM_TRACKING_RETRY_S"):
        return float(os.environ["MIM_TRACKING_RETRY_S"])
    busy = any(t in str(e).lower() for t in _BUSY_TEXT) or getattr(e, "get_http_status_code", lambda: 0)() == 429
    return RETRY_BUDGET_S if busy else UNREACHABLE_BUDGET_S


def _retry(call, *args, **kwargs):
    """call(*args, **kwargs), retried on transient store errors with exponential backoff and jitter (no attempt
    starts later than _budget(error) after the first); other errors, and the last one when the budget is spent,
    propagate unchanged.

    Safe to repeat: a failed SQL transaction is rolled back, and re-sending the same params, tags, status or
    metric (same timestamp and step) is a no-op in MLflow's stores. Over HTTP, a create_run whose reply was lost
    could leave an extra run; create_experiment's duplicate is handled in NodeRun._experiment."""
    global retries
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)      # read by MLflow at each request
    start = time.monotonic()
    for attempt in itertools.count():
        try:
            return call(*args, **kwargs)
        except Exception as e:
            delay = min(0.05 * 2 ** attempt, 5.0) * random.uniform(0.5, 1.5)
            if not _transient(e) or time.monotonic() + delay > start + _budget(e):
                raise
            retries += 1
            busy = _budget(e) == RETRY_BUDGET_S
            log.log(logging.WARNING if busy else logging.INFO, "MLflow store %s (%s): %s again in %.2f s (retry %d)",
                    "busy" if busy else "unreachable", str(e).splitlines()[0][:200],
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
def _flocked(path: Path):
    """Hold an exclusive flock on `path` (made with its folder) for the block: one process at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _store_lock():
    """Serialise experiment/parent creation between processes sharing this results folder.

    That covers one machine (flock on a local disk). Jobs on several machines, logging to one server, do not
    share it: there the store's unique experiment names settle create_experiment (see _experiment) and _parent
    looks again after making a parent."""
    return _flocked(RESULTS / ".mlflow.lock")


class _Store:
    """The writes a node makes, as operations on the store (the same code online and in a replay). Each takes
    JSON values only, so that it can be written to a journal instead; run ids may be placeholders, mapped by
    `ids` (placeholder -> the store's id) once their run is made."""

    def __init__(self, client, ids: dict | None = None, replay: bool = False):
        self.client, self.ids, self.replay = client, ids if ids is not None else {}, replay

    def _id(self, run: str) -> str:
        return self.ids.get(run, run)

    def open(self, experiment: str, chain: str, seed: str, env: dict, run_name: str, tags: dict, start_time: int,
             ref: str | None = None) -> tuple[str, str, str]:
        """The node's run (and its experiment and chain's parent, made if new): (run, parent, experiment id). A replay
        first looks for the run an interrupted replay may have made (same node, same start time)."""
        with _store_lock():
            experiment_id = _experiment(self.client, experiment)
            parent_id = _parent(self.client, experiment_id, chain, seed, env)
        found = self.replay and self.client.search_runs(
            [experiment_id], f"tags.node = '{tags['node']}' and attributes.start_time = {start_time}", max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            tags = dict(tags, **{"mlflow.parentRunId": parent_id})
            run_id = self.client.create_run(experiment_id, start_time=start_time, run_name=run_name,
                                            tags=tags).info.run_id
        if ref:
            self.ids[ref], self.ids[_parent_ref(ref)] = run_id, parent_id
        return run_id, parent_id, experiment_id

    def resume(self, run: str) -> None:
        self.client.update_run(self._id(run), status="RUNNING")

    def params(self, run: str, params: dict) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self._id(run)).data.params
        items = [Param(k, v) for k, v in params.items() if k not in have]
        for i in range(0, len(items), 100):
            self.client.log_batch(self._id(run), params=items[i:i + 100])

    def metrics(self, run: str, metrics: list) -> None:
        """metrics: [key, value, timestamp (ms), step] each."""
        from mlflow.entities import Metric

        if metrics:
            self.client.log_batch(self._id(run), metrics=[Metric(k, v, t, s) for k, v, t, s in metrics])

    def chain_metrics(self, run: str, metrics: list) -> None:
        """metrics as for `metrics`, on the chain's parent run of `run` (its mlflow.parentRunId)."""
        self.metrics(self.client.get_run(self._id(run)).data.tags["mlflow.parentRunId"], metrics)

    def inputs(self, run: str, dataset: dict, tags: dict) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        self.client.log_inputs(self._id(run), [DatasetInput(Dataset(**dataset),
                                                             [InputTag(k, v) for k, v in tags.items()])])

    def artifact(self, run: str, path: str) -> None:
        if self.replay and not Path(path).is_file():    # its copy gone (a journal's files removed by hand)
            log.warning("not logging %s to run %s: the file is gone", path, self._id(run))
            return
        self.client.log_artifact(self._id(run), path)

    def tags(self, run: str, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self._id(run), k, v)

    def end(self, run: str, status: str, end_time: int) -> None:
        self.client.set_terminated(self._id(run), status, end_time=end_time)


def _parent_ref(ref: str) -> str:
    """The placeholder id of the chain's parent of a run made offline (ref: its placeholder)."""
    return ref.replace(OFFLINE, OFFLINE + "parent-", 1)


def _experiment(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    key, kind = EXPERIMENT_KIND
    exp = client.get_experiment_by_name(name)
    if exp:
        if key not in exp.tags:          # made before the tag was set (a kind someone chose stays)
            client.set_experiment_tag(exp.experiment_id, key, kind)
        return exp.experiment_id
    try:
        return client.create_experiment(name, tags={key: kind})     # the UI's training view
    except MlflowException as e:          # another machine made it first (the name is unique in the store)
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _parent(client, experiment_id: str, chain: str, seed: str, env: dict) -> str:
    """The oldest chain run of (chain, seed), made if there is none.

    Without the shared lock (jobs on several machines) two jobs may both find none and both make one; each
    then looks again and takes the oldest, and so does every later node. Only jobs racing within moments
    can still end up under different parents (start times are client clocks); then an extra chain run
    stays. Nothing is deleted: another job may already have taken the run that lost."""
    def oldest() -> str | None:
        runs = client.search_runs(
            [experiment_id], f"tags.chain = '{chain}' and tags.seed = '{seed}' and tags.role = 'chain'",
            max_results=1, order_by=["attributes.start_time ASC"])      # ties: by run id, in every store
        return runs[0].info.run_id if runs else None

    if found := oldest():
        return found
    name = chain if seed == "all" else f"{chain} seed{seed}"
    tags = {**env, "mlflow.source.name": "pipeline", "chain": chain, "seed": seed, "role": "chain"}
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    return oldest()


def _say(line: str) -> None:
    """One line on stderr, on a line of its own even while a progress bar is drawn there (tqdm.write)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def _cause(e: BaseException) -> str:
    """What failed, in a few words: the system's reason (connection refused, timed out, ...) where the error holds
    one, else its first line."""
    import re

    text = str(e).strip()
    found = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)|(Read timed out|timed out|database is locked)", text)
    if found:
        return next(a or b for a, b in reversed(found)).strip()
    return (text.splitlines()[0][:160] if text else "") or type(e).__name__


def _now_ms() -> int:
    return int(time.time() * 1000)


class NodeRun:
    """The child MLflow run of one DAG node, nested under its chain's parent run.

    Every write goes through `_do`: to the store, or, once the store has failed past its retries (`offline`),
    to the node's journal (JOURNALS/<node id>.jsonl) for a later `replay`."""

    def __init__(self, params: dict, chain: str, node_id: str, tags: dict, run_id: str | None = None):
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(params)
        if uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (seconds of import: not under the lock)
        self._env = environment_tags()          # git and package look-ups: outside the lock
        self.uri, self.node_id, self.offline, self._monitor = uri, node_id, False, None
        self._journal = Journal(node_id)
        self.client = None
        seed = str(params.get("seed", "all"))          # "all": nodes of the whole study (data, report)
        try:
            with _store_lock():                        # opens the store, makes its tables if new: one at a time
                self.client = _RetryingClient(_retry(MlflowClient, uri))
            replay(uri, self.client, mine=node_id)     # what earlier nodes (or this one) could not log
        except Exception as e:
            if not _transient(e):
                raise
            self._go_offline(e)
        self._store = _Store(self.client, _read_ids())
        run_id = self._store.ids.get(run_id, run_id)   # a run made offline, since logged: its id in the store
        if run_id and run_id.startswith(OFFLINE) and not self.offline and not self._journal.path.is_file():
            run_id = None                              # made offline, its journal gone: a new run
        if run_id is None:
            tags = {**self._env, "mlflow.source.name": source_name(node_id),
                    **{k: str(v) for k, v in tags.items()}, "chain": chain, "node": node_id, "seed": seed}
            ref = OFFLINE + uuid.uuid4().hex
            opened = self._do("open", params["study"], chain, seed, self._env, node_id, tags, _now_ms(), ref=ref)
            self.run_id, self.parent_id, self.experiment_id = opened if opened else (ref, _parent_ref(ref), None)
        else:
            self.run_id, self.experiment_id = run_id, None
            self.parent_id = _parent_ref(run_id) if run_id.startswith(OFFLINE) else None
            self._do("resume", run_id)
            if self.parent_id is None and not self.offline:
                try:
                    run = self.client.get_run(run_id)
                    self.parent_id, self.experiment_id = run.data.tags.get("mlflow.parentRunId"), run.info.experiment_id
                except Exception as e:                 # offline, the parent stays unknown: chain_metrics looks it up
                    if not _transient(e):
                        raise
                    self._go_offline(e)

    def _do(self, op: str, *args, **kwargs):
        """_Store.<op>(*args, **kwargs) on the store; offline (or when the store fails now), into the journal."""
        if not self.offline:
            try:
                return getattr(self._store, op)(*args, **kwargs)
            except Exception as e:
                if not _transient(e):
                    raise
                self._go_offline(e)
        self._journal.append(self.uri, op, args, kwargs)
        return None

    def _go_offline(self, e: BaseException) -> None:
        """From now on, journal; one warning line; system metrics stop (their thread fails quietly)."""
        self.offline = True
        logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
        if self._monitor is not None:
            self._monitor._shutdown_event.set()        # no join: it may be waiting on the store
            self._monitor = None
        cause = _cause(e)
        _say(f"warning: MLflow store {self.uri} unreachable ({cause}); {self.node_id} goes on without it and keeps "
             f"what it logs in {self._journal.path}: `python -m pipeline.orchestration.tracking sync` (or any later "
             "node) logs it once the store answers")

    def log_params(self, params: dict) -> None:
        self._do("params", self.run_id, {k: v[:6000] for k, v in flatten(params).items()})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        now = _now_ms()
        self._do("metrics", self.run_id,
                 [[k, float(v), now, step or 0] for k, v in metrics.items() if isinstance(v, (int, float))])

    def log_chain_metrics(self, metrics: dict, step: int) -> None:
        """Metrics of this node on its chain's parent run at step `step` (the chain's stage), so the parent's
        chart shows them across the chain."""
        now = _now_ms()
        self._do("chain_metrics", self.run_id, [[k, float(v), now, step] for k, v in metrics.items()])

    def log_dataset(self, params: dict, context: str) -> bool:
        """The prepared dataset (layout.dataset_path) as an input of this run (the UI's Dataset column): a
        MetaDataset, no pixels read; name: data.dataset and image size; digest: the first 36 characters of the
        dataset hash of its sidecar (36: the SQL stores' digest column), the whole hash in the input tag
        dataset_hash; source: the artefact's path. False (nothing logged) when the dataset has no sidecar yet."""
        from mlflow.data.dataset_source_registry import get_dataset_source_from_json
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        path = layout.dataset_path(params)
        try:
            digest = json.loads(layout.sidecar(path).read_text())["dataset_hash"]
        except (OSError, ValueError, KeyError):
            return False
        source = get_dataset_source_from_json(json.dumps({"uri": str(path.resolve())}), "local")
        d = params["data"]
        entity = MetaDataset(source, name=f"{d['dataset']} {d['img_size']}px", digest=digest[:36])._to_mlflow_entity()
        dataset = {k: getattr(entity, k) for k in ("name", "digest", "source_type", "source", "schema", "profile")}
        self._do("inputs", self.run_id, dataset, {MLFLOW_DATASET_CONTEXT: context, "dataset_hash": digest})
        return True

    def start_system_metrics(self, resume: bool = False) -> None:
        """MLflow's system metrics (system/cpu_utilization_percentage, memory, disk, network, GPU where there is
        one) of this run, sampled every SYSTEM_METRICS_INTERVAL_S seconds by a daemon thread until finish();
        resume continues a continued run's steps. A monitor that cannot start is logged, never fatal; none while
        the store is down."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        if self.offline:
            return
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
            if not Path(p).is_file():
                continue
            if not self.offline:
                try:
                    self._store.artifact(self.run_id, str(p))
                    continue
                except Exception as e:
                    if not _transient(e):
                        raise
                    self._go_offline(e)
            # a copy: the file may change before the journal is replayed
            self._journal.append(self.uri, "artifact", (self.run_id, self._journal.keep(Path(p))), {})

    def set_tags(self, tags: dict) -> None:
        self._do("tags", self.run_id, {k: str(v) for k, v in tags.items()})

    def finish(self, ok: bool = True) -> None:
        """End the run (FINISHED, or FAILED); a node that went offline then logs its journal if the store
        answers again (one quick try: it never waits for the store here)."""
        try:
            self.stop_system_metrics()
        finally:
            self._do("end", self.run_id, "FINISHED" if ok else "FAILED", _now_ms())
        if self.offline and self._journal.path.is_file():
            from mlflow.tracking import MlflowClient

            try:
                client = MlflowClient(self.uri)
                client.search_experiments(max_results=1)      # one try (MLflow's own few retries): is it back?
                done = replay(self.uri, client, only=self.node_id, mine=self.node_id)
            except Exception as e:
                if not _transient(e):
                    raise
                return
            if done:
                _say(f"note: MLflow store {self.uri} answers again: logged what {self.node_id} kept in "
                     f"{self._journal.path}")


class Journal:
    """What a node could not log: one JSON line per _Store operation, in order, in JOURNALS/<node id>.jsonl; the
    artefacts it names are copies in JOURNALS/<node id>.files/ (their own file names, in folders of their own)."""

    def __init__(self, node_id: str):
        self.path = JOURNALS / f"{node_id}.jsonl"
        self.files = JOURNALS / f"{node_id}.files"

    def append(self, uri: str, op: str, args: tuple, kwargs: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"uri": uri, "op": op, "args": list(args), "kwargs": kwargs}) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def keep(self, path: Path) -> str:
        """A copy of the artefact at path, under this journal's files (relative to the working directory)."""
        dst = self.files / uuid.uuid4().hex[:12] / path.name
        dst.parent.mkdir(parents=True)
        shutil.copyfile(path, dst)
        return str(dst)

    def entries(self) -> list[dict]:
        """The journal's operations; a last line cut short (a node killed while writing it) is left out."""
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                break
        return out

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.files, ignore_errors=True)


def _read_ids() -> dict:
    try:
        return json.loads((JOURNALS / "ids.json").read_text())
    except (OSError, ValueError):
        return {}


def _running(node_id: str) -> bool:
    """Whether another process runs this node now (it holds results/.locks/<node>.lock: cli.exclusive)."""
    path = RESULTS / ".locks" / f"{node_id}.lock"
    if not path.is_file():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def pending(uri: str | None = None) -> list[Journal]:
    """The journals waiting to be logged (to the store at uri; None: any)."""
    if not JOURNALS.is_dir():
        return []
    out = []
    for path in sorted(JOURNALS.glob("*.jsonl")):
        try:
            with open(path) as f:
                first = json.loads(f.readline())          # a journal is for one store: its first line says which
        except (OSError, ValueError):
            continue                                      # empty, or cut short in its first line: nothing to log
        if uri is None or first["uri"] == uri:
            out.append(Journal(path.name[:-len(".jsonl")]))
    return out


def replay(uri: str, client, only: str | None = None, mine: str | None = None) -> list[str]:
    """Log the journals kept for the store at uri (only: that node's) in their order, each removed once logged;
    journals of nodes that run now in other processes are left for later (their node logs them itself; mine: the
    node this process runs, whose lock it holds). The node ids logged; a store error propagates (the journal
    stays, and a later replay does it all again)."""
    journals = [j for j in pending(uri) if only is None or j.path.name == f"{only}.jsonl"]
    if not journals:
        return []
    with _replay_lock():
        return _replay(journals, client, mine)


def _replay_lock():
    """One replay at a time among the processes sharing this results folder (not _store_lock: a replay takes it
    to make runs)."""
    return _flocked(JOURNALS / ".lock")


def _replay(journals: list[Journal], client, mine: str | None) -> list[str]:
    done = []
    store = _Store(client if isinstance(client, _RetryingClient) else _RetryingClient(client), _read_ids(),
                   replay=True)
    for journal in journals:
        node = journal.path.name[:-len(".jsonl")]
        if (node != mine and _running(node)) or not journal.path.is_file():    # running; or replayed meanwhile
            continue
        for e in journal.entries():
            getattr(store, e["op"])(*e["args"], **e["kwargs"])
        with _store_lock():
            ids = _read_ids()
            ids.update(store.ids)
            from pipeline.checkpoint import write_json

            write_json(JOURNALS / "ids.json", ids)
        journal.remove()
        done.append(node)
    return done


@contextmanager
def tracked(params: dict, chain: str, node_id: str, out_dir: Path, sections: list[str],
            tags: dict | None = None, run_id: str | None = None):
    """Start (or continue) the node's child run, log its params, write out_dir/params.yaml, yield the run.

    A node that reads the prepared dataset (DATA_CONTEXT) logs it as the run's input; prepare_data logs the
    dataset it wrote when its block ends. A training node (TRAINING_NODES) records system metrics while the
    block runs. The run ends FINISHED when the block completes and FAILED when it raises; either way the
    system-metrics thread stops. With the store down, all of it goes to the node's journal (NodeRun).
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


def sync(argv: list[str] | None = None) -> int:
    """`python -m pipeline.orchestration.tracking sync [--uri URI]`: log every journal kept for its store (or
    only those for URI); one line on what was logged, or why not (exit 1, the journals kept)."""
    import argparse

    from mlflow.tracking import MlflowClient

    parser = argparse.ArgumentParser(prog="python -m pipeline.orchestration.tracking",
                                     description="log what nodes kept while their MLflow store was down")
    parser.add_argument("command", choices=["sync"])
    parser.add_argument("--uri", default=None, help="only the journals kept for this store (default: all)")
    args = parser.parse_args(argv)
    uris = sorted({json.loads(j.path.read_text().splitlines()[0])["uri"] for j in pending(args.uri)})
    if not uris:
        print(f"nothing to sync: no journal in {JOURNALS}")
        return 0
    done = []
    for uri in uris:
        try:
            done += replay(uri, MlflowClient(uri))
        except Exception as e:
            left = len(pending())
            print(f"error: MLflow store {uri} unreachable ({_cause(e)}); {left} journals kept in "
                  f"{JOURNALS}, run sync again once the store answers", file=sys.stderr)
            return 1
    left = pending(args.uri)
    print(f"synced {len(done)} journals ({', '.join(done) or 'none'}) to {', '.join(uris)}"
          + (f"; {len(left)} of running nodes left for them" if left else ""))
    return 0


if __name__ == "__main__":
    sys.exit(sync())
