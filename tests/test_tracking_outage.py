"""Tracking is never on the critical path (issue 25, item 1): real nodes against a real `mlflow server` that goes
down, compared run by run and metric by metric with a store that never went down.

The same tiny chain (prepare_data, pretrain@seed0-mae, knn of it, pretrain@seed0-sdae) runs twice, in two folders:
once against a store that never goes down (the reference: SQLite), once against an `mlflow server` that
- is stopped in the middle of the mae pre-training node (after its first epoch was logged) and started again while
  the node still runs: the node goes on, keeps what it could not log, and logs it itself at its end;
- is down when knn and the sdae pre-training node start: both end (exit 0, one warning line, their outputs as the
  reference's); `sync` while the store is still down says so in one line and keeps the journals, and once it is
  up logs them.
Then both stores hold the same runs (no duplicates, the same parents), params, tags, per-epoch metrics with their
steps, dataset inputs and artefacts. A later node logging what an earlier one kept: test_later_node_logs_the_journal.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser import free_port, start_mlflow, stop_process
from conftest import copy_dag, run_cli
from mlflow.tracking import MlflowClient

from pipeline.dag import stage_module

pytestmark = pytest.mark.e2e
EPOCHS = 2
TINY = ["--preset", "tiny", "--set", f"pretrain.epochs={EPOCHS}", "--set", "pretrain.checkpoint_every_min=0"]
FAST = {"MIM_TRACKING_RETRY_S": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
TIMING = ("seconds", "images_per_s", "wall_s")       # metrics of the clock: their keys and steps are compared
NODES = ("prepare_data", "pretrain@seed0-mae", "knn@seed0-mae", "pretrain@seed0-sdae")


class Server:
    """A real `mlflow server` on a fixed local port with its own SQLite store and artefact folder, that can be
    stopped and started again (the same store) while nodes use it."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)

    def start(self, timeout_s: float = 120) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.proc = start_mlflow(["server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                                  "--default-artifact-root", f"file://{self.root}/artifacts", "--workers", "1"],
                                 self.port, self.root, self.root / "server.log", env, timeout_s)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None


@pytest.fixture
def server(tmp_path):
    made = Server(tmp_path / "outage-store")
    try:
        yield made
    finally:
        made.stop()


def node(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", stage_module(name), *args, *TINY]


def warnings(stderr: str) -> list[str]:
    """The warning lines (a progress bar may have drawn on the same line before: split at \\r too)."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.startswith("warning:")]


def pretrain_through_restart(workdir: Path, server: Server, env: dict) -> subprocess.CompletedProcess:
    """The pre-training node against `server`, stopped once the node's first epoch is in the store and started
    again once the node has gone on without it; the node is paused (SIGSTOP) while the server stops and starts,
    so each happens in the middle of its run."""
    full = dict(os.environ, **env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(node("pretrain", "--method", "mae"), cwd=workdir, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    client, lock = MlflowClient(server.url), workdir / "results/.locks/pretrain@seed0-mae.lock"
    journal = workdir / "results/.tracking/pretrain@seed0-mae.jsonl"
    deadline = time.monotonic() + 300

    def wait_for(condition, what: str) -> None:
        while not condition():
            assert proc.poll() is None, f"the node ended before {what}:\n{proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def first_epoch_logged() -> bool:
        runs = client.search_runs(["1"], "tags.node = 'pretrain@seed0-mae'")
        return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "loss"))

    wait_for(first_epoch_logged, "its first epoch was logged")
    pid = int(lock.read_text())                      # the node's own process (it may run in a fork server's child)
    os.kill(pid, signal.SIGSTOP)
    server.stop()
    os.kill(pid, signal.SIGCONT)
    wait_for(journal.is_file, "it kept its first write in a journal")
    os.kill(pid, signal.SIGSTOP)
    server.start()
    os.kill(pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(proc.args, 0, out, err)


def chain(workdir: Path, uri: str, server: Server | None = None) -> dict:
    """The tiny chain logging to uri; with `server` (serving uri), the server goes down and up around the nodes as
    the module says. The nodes' stderr by node, and how the syncs went."""
    env = {"MLFLOW_TRACKING_URI": uri, **FAST}
    run = dict(cwd=workdir, env=env)
    log = {"prepare_data": run_cli(*node("prepare_data"), **run).stderr}
    if server is None:
        for name, args in (("pretrain", ["--method", "mae"]), ("knn", ["--weights", "mae"]),
                           ("pretrain", ["--method", "sdae"])):
            log[args[-1] if name == "pretrain" else name] = run_cli(*node(name, *args), **run).stderr
        return log
    log["pretrain"] = pretrain_through_restart(workdir, server, env).stderr
    server.stop()
    t0 = time.monotonic()
    log["knn"] = run_cli(*node("knn", "--weights", "mae"), **run).stderr          # exit 0 (run_cli checks)
    log["knn_seconds"] = time.monotonic() - t0
    log["sdae"] = run_cli(*node("pretrain", "--method", "sdae"), **run).stderr     # exit 0 (run_cli checks)
    log["journals"] = sorted(p.name for p in (workdir / "results/.tracking").glob("*.jsonl"))
    down = run_cli(sys.executable, "-m", "pipeline.orchestration.tracking", "sync", check=False, **run)
    log["sync_down"] = (down.returncode, down.stdout, down.stderr)
    server.start()
    log["sync_up"] = run_cli(sys.executable, "-m", "pipeline.orchestration.tracking", "sync", **run).stdout
    return log


def store_contents(url: str, root: Path) -> dict:
    """Every run of the study's experiment by name: status, tags (the parent by name; paths relative to root),
    params, metric histories [(step, value)] (clock metrics: steps only; no system metrics), dataset inputs and
    artefacts (name -> sha256; metrics.json: its keys)."""
    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], max_results=1000)
    names = {r.info.run_id: r.info.run_name for r in runs}
    out = {}
    for r in runs:
        assert r.info.run_name not in out, f"two runs named {r.info.run_name}"
        tags = {k: (names[v] if k == "mlflow.parentRunId" else v) for k, v in r.data.tags.items()
                if k not in ("mlflow.log-model.history",)}
        metrics = {}
        for key in r.data.metrics:
            if key.startswith("system/"):
                continue
            history = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, key))
            metrics[key] = [s for s, _ in history] if key in TIMING else history
        inputs = sorted((i.dataset.name, i.dataset.digest, i.dataset.source.replace(str(root), "<root>"),
                         tuple(sorted((t.key, t.value) for t in i.tags))) for i in r.inputs.dataset_inputs)
        out[r.info.run_name] = {"status": r.info.status, "tags": tags, "params": r.data.params,
                                "metrics": metrics, "inputs": inputs,
                                "artifacts": artifacts(client, r.info.run_id)}
    return out


def artifacts(client: MlflowClient, run_id: str) -> dict:
    out = {}
    for a in client.list_artifacts(run_id):
        path = Path(client.download_artifacts(run_id, a.path))
        out[a.path] = sorted(json.loads(path.read_text())) if a.path == "metrics.json" \
            else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_store_down_mid_run_and_at_start_costs_no_work_and_no_data(tmp_path, server):
    (tmp_path / "ref").mkdir()
    (tmp_path / "out").mkdir()
    ref_dir, out_dir = copy_dag(tmp_path / "ref"), copy_dag(tmp_path / "out")
    server.start()
    reference = f"sqlite:///{ref_dir}/mlflow.db"
    chain(ref_dir, reference)
    log = chain(out_dir, server.url, server)

    # the pre-training node: one warning line naming the store, what failed and how to sync; then it logged its
    # journal itself when the store answered again
    lines = warnings(log["pretrain"])
    assert len(lines) == 1, log["pretrain"][-3000:]
    assert lines[0].startswith(f"warning: MLflow store {server.url} unreachable (Connection refused); "
                               "pretrain@seed0-mae goes on without it and keeps what it logs in "
                               "results/.tracking/pretrain@seed0-mae.jsonl: `python -m pipeline.orchestration."
                               "tracking sync`"), lines[0]
    assert "answers again" in log["pretrain"] and "Traceback" not in log["pretrain"]
    # knn with the store down: exit 0 (run_cli), one warning line, no traceback, in seconds; its journal kept
    assert len(warnings(log["knn"])) == 1 and "Traceback" not in log["knn"], log["knn"][-3000:]
    assert log["knn_seconds"] < 60 and log["journals"] == ["knn@seed0-mae.jsonl", "pretrain@seed0-sdae.jsonl"]
    assert len(warnings(log["sdae"])) == 1 and "Traceback" not in log["sdae"], log["sdae"][-3000:]
    code, _, err = log["sync_down"]
    assert code == 1 and err.startswith(f"error: MLflow store {server.url} unreachable (Connection refused); "
                                        "2 journals kept") and len(err.strip().splitlines()) == 1, err
    assert log["sync_up"].splitlines()[-1] == \
        f"synced 2 journals (knn@seed0-mae, pretrain@seed0-sdae) to {server.url}", log["sync_up"]
    assert not list((out_dir / "results/.tracking").glob("*.jsonl"))

    # outputs: the same as with a store that never went down
    for path in ("seed0/pretrain/mae/encoder.safetensors", "seed0/pretrain/mae/loss.csv",
                 "seed0/pretrain/sdae/encoder.safetensors", "seed0/pretrain/sdae/loss.csv"):
        assert (ref_dir / "results" / path).read_bytes() == (out_dir / "results" / path).read_bytes(), path
    ref, got = (json.loads((d / "results/seed0/knn/mae/metrics.json").read_text()) for d in (ref_dir, out_dir))
    assert ref["metrics"] == got["metrics"]

    # the stores: run by run, metric by metric
    want, got = store_contents(reference, ref_dir), store_contents(server.url, out_dir)
    assert sorted(got) == sorted(want) and {"data", "mae seed0", "sdae seed0", *NODES} <= set(got)
    for name in want:
        for part in ("status", "tags", "params", "metrics", "inputs", "artifacts"):
            assert got[name][part] == want[name][part], (name, part)
    assert [s for s, _ in got["pretrain@seed0-mae"]["metrics"]["loss"]] == list(range(EPOCHS))


def node_runs(params: dict, out: Path) -> None:
    """What the test below logs, in order: a training node's run interrupted (FAILED) and resumed by id (as its
    resumable state holds it), and a linprobe run, while the store may be down; then (yield) the training run
    resumed again by its node's process (holding the node's lock), and a knn run with a metric on its chain's
    parent."""
    from pipeline.orchestration.cli import exclusive
    from pipeline.orchestration.tracking import NodeRun, tracked
    from pipeline.stages.evaluation.common import log_on_chain

    first = NodeRun(params, "mae", "pretrain@seed0-mae", {"method": "mae"})
    first.log_params({"pretrain": params["pretrain"]})
    first.log_metrics({"loss": 1.0}, step=0)
    first.finish(ok=False)
    resumed = NodeRun(params, "mae", "pretrain@seed0-mae", {}, run_id=first.run_id)
    resumed.log_metrics({"loss": 0.5}, step=1)
    resumed.finish(ok=False)
    with tracked(params, "mae", "linprobe@seed0-mae", out / "linprobe", ["seed"]) as run:
        log_on_chain(run, "linprobe", "mae", {"top1": 0.5})
    yield first.run_id
    with exclusive("pretrain@seed0-mae"):
        last = NodeRun(params, "mae", "pretrain@seed0-mae", {}, run_id=first.run_id)
        last.log_metrics({"loss": 0.25}, step=2)
        last.finish()
    with tracked(params, "mae", "knn@seed0-mae", out / "knn", ["seed"]) as run:
        run.log_metrics({"top1": 0.25})
        log_on_chain(run, "knn", "mae", {"top1": 0.25})


def test_later_node_logs_the_journal(workdir, server, monkeypatch, capsys):
    """A store down while a training run starts, is interrupted and resumed (its placeholder id in the state), and
    while a linprobe run is made; a sync that is cut off after making linprobe's run; then, with the store up, the
    training node resumed again logs its own journal and linprobe's before it goes on, and its placeholder id
    continues the run the sync made. The store then holds what a store that never went down holds."""
    from pipeline import config
    from pipeline.orchestration import tracking

    monkeypatch.setenv("MIM_TRACKING_RETRY_S", "0.2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    params = config.load("tiny")
    reference = dict(params, tracking=dict(params["tracking"], uri=f"sqlite:///{workdir}/reference.db"))
    for _ in node_runs(reference, workdir / "results/ref"):
        pass
    shutil.rmtree(workdir / "results/.tracking", ignore_errors=True)

    params["tracking"] = dict(params["tracking"], uri=server.url)        # not started yet: down
    runs = node_runs(params, workdir / "results/out")
    placeholder = next(runs)
    assert placeholder.startswith(tracking.OFFLINE)
    journals = workdir / "results/.tracking"
    err = capsys.readouterr().err
    assert err.count("warning: MLflow store") == 3                     # one line per node run, 3 runs
    assert sorted(p.name for p in journals.glob("*.jsonl")) == ["linprobe@seed0-mae.jsonl", "pretrain@seed0-mae.jsonl"]
    server.start()
    shutil.copytree(journals, workdir / "kept")
    assert tracking.replay(server.url, MlflowClient(server.url), only="linprobe@seed0-mae") == ["linprobe@seed0-mae"]
    for name in ("linprobe@seed0-mae.jsonl", "linprobe@seed0-mae.files"):    # as if that sync had been killed
        shutil.move(workdir / "kept" / name, journals / name)             # before it removed the journal
    next(runs, None)                    # the training node resumed, then knn
    assert not list(journals.glob("*.jsonl"))
    assert store_contents(server.url, workdir) == store_contents(reference["tracking"]["uri"], workdir)
    pretrain = store_contents(server.url, workdir)["pretrain@seed0-mae"]
    assert pretrain["metrics"]["loss"] == [(0, 1.0), (1, 0.5), (2, 0.25)] and pretrain["status"] == "FINISHED"
