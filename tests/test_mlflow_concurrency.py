"""MLflow under concurrency: node processes log at once to one store, then every run, param and metric point
is counted. Against the default SQLite store and against an `mlflow server` the tests start; no process may
fail, and a store that stays locked past SQLite's own wait is retried (pipeline.orchestration.tracking._retry)."""
import logging
import multiprocessing
import os
import re
import sqlite3
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
from browser import free_port, mlflow_process
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from pipeline import config
from pipeline.orchestration import tracking

STEPS = 25                                              # metric steps per node, one log_metrics call per metric
METRICS = ("loss", "lr", "knn_acc")
SECTIONS = ("data", "model", "pretrain", "linprobe")    # 39 params per node
NODES = [("mae", 0), ("mae", 0), ("mae", 1), ("dbot_mae", 0),               # (chain, seed) of node i: several
         ("dbot_mae", 0), ("dbot_mae", 0), ("dbot_mae", 1), ("supervised", 0)]  # nodes share a parent
OVERRIDES = ["seeds=[0,1]"]
PRELOAD = ["pytest", "jsonschema", "yaml", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
           "mlflow.store.tracking.rest_store"]    # site-packages only: a 3.11 forkserver has no tests/ on its path


@pytest.fixture(autouse=True, scope="module")
def own_fork_server():
    """multiprocessing has one fork server per process, whose preload is fixed when it starts: stop the one these
    tests start (PRELOAD, no torch), or a later test of the same worker that forks from it (the benchmarks' child
    pools, pipeline.bench.throughput.child_pool) gets a server without its own preload, and every child imports torch
    anew (the scaling test after one of these tests in one process: 133 s, against 11 s with the server stopped)."""
    yield
    import multiprocessing.forkserver

    multiprocessing.forkserver._forkserver._stop()       # the method CPython keeps for its own tests


@pytest.fixture
def params(workdir):
    return config.load("tiny", overrides=OVERRIDES)


def node(i: int, chain: str, seed: int, params: dict, cwd: Path, steps: int, barrier, queue) -> None:
    """One node process: a NodeRun, its params, steps x len(METRICS) log_metrics calls, tags, finish.
    Puts (i, {"run_id", "retries", "messages", "seconds", "cpu", "open"}) or (i, {"error": traceback})."""
    try:
        os.chdir(cwd)                          # tracking's lock file is results/.mlflow.lock, cwd-relative
        messages = []
        handler = logging.Handler()
        handler.emit = lambda record: messages.append(record.getMessage())
        logging.getLogger(tracking.__name__).addHandler(handler)   # the retry warnings, counted
        params = config.with_seed(params, seed)
        barrier.wait(timeout=120)              # all nodes start logging together
        t0, cpu0 = time.monotonic(), time.process_time()
        run = tracking.NodeRun(params, chain, f"node{i}@seed{seed}-{chain}", {"worker": i})
        opened = time.monotonic() - t0
        run.log_params({s: params[s] for s in SECTIONS})
        for step in range(steps):
            for k in METRICS:
                run.log_metrics({k: step + i / 100}, step=step)
        run.set_tags({"worker_done": 1, "steps": steps})
        run.finish()
        queue.put((i, {"run_id": run.run_id, "retries": tracking.retries, "messages": messages, "open": opened,
                       "seconds": time.monotonic() - t0, "cpu": time.process_time() - cpu0}))
    except BaseException:
        queue.put((i, {"error": traceback.format_exc()}))
        raise


def run_nodes(uri: str, cwd: Path, params: dict, nodes=NODES, steps=STEPS, machines=False) -> list[dict]:
    """Run one process per (chain, seed) in nodes, all at once, against the store at uri (params tracking.uri).

    The processes are forked from a forkserver that imported mlflow once: separate processes with their own
    store connections, without N copies of seconds of imports competing for the CPU first.
    machines=True gives each its own working directory, hence its own results/ lock, like jobs on several
    machines."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    params = dict(params, tracking={**params["tracking"], "uri": uri})
    barrier, queue = ctx.Barrier(len(nodes)), ctx.Queue()
    dirs = [cwd / f"machine{i}" if machines else cwd for i in range(len(nodes))]
    for d in dirs:
        d.mkdir(exist_ok=True)
    procs = [ctx.Process(target=node, args=(i, chain, seed, params, dirs[i], steps, barrier, queue))
             for i, (chain, seed) in enumerate(nodes)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=300) for _ in procs)
        failed = {i: r["error"] for i, r in results.items() if "error" in r}
        assert not failed, "\n".join(f"node {i} failed:\n{e}" for i, e in failed.items())
        for p in procs:
            p.join(timeout=30)
        assert [p.exitcode for p in procs] == [0] * len(nodes)
        return [results[i] for i in range(len(nodes))]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def count_store(uri: str, study: str, results: list[dict], params: dict, nodes=NODES, steps=STEPS) -> dict:
    """Check that every node's run, param and metric point reached the store; return the counts and the parents
    ({(chain, seed): [chain run id, ...]}, any extra chain run that racing jobs left included)."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(study).experiment_id],
                              run_view_type=ViewType.ALL, max_results=1000)
    parents = {}
    for r in runs:
        if r.data.tags.get("role") == "chain":
            assert r.info.status == "FINISHED" and r.info.lifecycle_stage == "active"
            parents.setdefault((r.data.tags["chain"], r.data.tags["seed"]), []).append(r.info.run_id)
    assert set(parents) == {(c, str(s)) for c, s in nodes}
    children = {r.info.run_id: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert sorted(children) == sorted(res["run_id"] for res in results)
    expected_params = tracking.flatten({s: params[s] for s in SECTIONS})
    points, used = 0, set()
    for i, (chain, seed) in enumerate(nodes):
        run = children[results[i]["run_id"]]
        assert run.info.status == "FINISHED" and run.info.run_name == f"node{i}@seed{seed}-{chain}"
        assert run.data.tags["mlflow.parentRunId"] in parents[(chain, str(seed))]
        used.add(run.data.tags["mlflow.parentRunId"])
        assert run.data.tags["worker"] == str(i) and run.data.tags["worker_done"] == "1"
        assert run.data.params == expected_params
        for k in METRICS:
            history = client.get_metric_history(run.info.run_id, k)
            assert sorted(m.step for m in history) == list(range(steps)), (i, k, len(history))
            points += len(history)
    return {"runs": len(children), "parent_runs": sum(map(len, parents.values())),
            "parents_used": len(used), "params": len(nodes) * len(expected_params), "points": points,
            "parents": parents}


def report(name: str, counts: dict, results: list[dict], seconds: float, steps=STEPS) -> None:
    kinds = sorted({m.split("(", 1)[1].split(")")[0][:60] for r in results for m in r["messages"]})
    counts = {k: v for k, v in counts.items() if k != "parents"}
    slowest, opened = max(r["seconds"] for r in results), max(r["open"] for r in results)
    retries, writes = sum(r["retries"] for r in results), len(results) * (len(METRICS) * steps + 6)
    print(f"\n[{name}] {len(results)} processes, {counts}, ~{writes} writes, retries {retries} {kinds}, slowest "
          f"node {slowest:.1f} s (NodeRun {opened:.1f} s, CPU of all nodes {sum(r['cpu'] for r in results):.1f} s), "
          f"test {seconds:.1f} s")


def test_concurrent_nodes_sqlite_store(workdir, params):
    """8 processes on one machine, default SQLite store: nothing lost, one parent per chain and seed."""
    t0 = time.monotonic()
    uri = f"sqlite:///{workdir}/mlflow.db"
    results = run_nodes(uri, workdir, params)
    counts = count_store(uri, "tiny", results, params)
    assert all(len(p) == 1 for p in counts["parents"].values()), counts["parents"]   # the shared lock
    report("sqlite", counts, results, time.monotonic() - t0)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """An `mlflow server` on a free local port with its own SQLite store and artifact root (one uvicorn worker,
    whose thread pool still writes concurrently); its process group is stopped by PID at the end, whatever
    happened."""
    root = tmp_path_factory.mktemp("mlflow-server")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"    # no huey job runners (7 processes) beside the server
    with mlflow_process(["server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--default-artifact-root",
                         f"file://{root}/artifacts", "--workers", "1"], root, root / "server.log", env, 120) as url:
        yield SimpleNamespace(url=url, log=root / "server.log")


def test_concurrent_nodes_mlflow_server(workdir, params, mlflow_server):
    """The same 8 processes against a server: nothing lost, one parent per chain and seed."""
    t0 = time.monotonic()
    results = run_nodes(mlflow_server.url, workdir, params)
    counts = count_store(mlflow_server.url, "tiny", results, params)
    assert all(len(p) == 1 for p in counts["parents"].values()), counts["parents"]
    busy = len(re.findall(r'HTTP/1\.1" (?:429|5\d\d)', mlflow_server.log.read_text()))
    report(f"server, {busy} responses 429/5xx", counts, results, time.monotonic() - t0)


def test_nodes_on_several_machines_share_a_server(workdir, params, mlflow_server):
    """6 processes with no shared lock (each its own results/), racing to make the same new experiment and
    parents: every node logs, each under a chain run of its own chain and seed."""
    t0 = time.monotonic()
    nodes = [("mae", 0)] * 4 + [("dbot_mae", 0)] * 2
    params = dict(params, study="tiny_machines")
    results = run_nodes(mlflow_server.url, workdir, params, nodes=nodes, steps=2, machines=True)
    counts = count_store(mlflow_server.url, "tiny_machines", results, params, nodes=nodes, steps=2)
    report("machines", counts, results, time.monotonic() - t0, steps=2)


def test_store_locked_past_sqlite_timeout_is_retried(workdir, params, caplog):
    """A writer holding the SQLite database for longer than MLflow's 20 s busy timeout: the node's write
    waits, gets "database is locked", retries, and lands once the lock is gone."""
    db = workdir / "mlflow.db"
    run = tracking.NodeRun(params, "mae", "locked@seed0-mae", {})
    lock = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(21, lambda: lock.execute("COMMIT"))
    release.start()
    before, t0 = tracking.retries, time.monotonic()
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        run.log_metrics({"loss": 1.0}, step=0)
    waited = time.monotonic() - t0
    release.join()
    lock.close()
    run.finish()
    assert waited >= 21 and tracking.retries > before
    assert "database is locked" in caplog.text
    client = MlflowClient(config.tracking_uri(params))
    assert [m.value for m in client.get_metric_history(run.run_id, "loss")] == [1.0]
    assert client.get_run(run.run_id).info.status == "FINISHED"
    print(f"\n[locked] write waited {waited:.1f} s, {tracking.retries - before} retries")


def test_retry_only_transient_errors(workdir, monkeypatch):
    """_retry repeats a busy store's error until it clears, passes any other error through unchanged, and
    gives up after RETRY_BUDGET_S with the store's own error; real MLflow errors are classified right."""
    def flaky(failures: list):
        def call():
            if failures:
                raise failures.pop(0)
            return "ok"
        return call

    locked = MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)
    before = tracking.retries
    assert tracking._retry(flaky([locked, locked])) == "ok" and tracking.retries == before + 2
    bad = MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)
    with pytest.raises(MlflowException) as e:
        tracking._retry(flaky([bad]))
    assert e.value is bad and tracking.retries == before + 2
    monkeypatch.setattr(tracking, "RETRY_BUDGET_S", 0.3)
    with pytest.raises(MlflowException) as e:
        tracking._retry(flaky([locked] * 1000))
    assert e.value is locked

    with pytest.raises(MlflowException) as e:                     # a run that does not exist: not transient
        MlflowClient(f"sqlite:///{workdir}/mlflow.db").get_run("0" * 32)
    assert not tracking._transient(e.value)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")    # no server on this port: transient
    with pytest.raises(MlflowException) as e:
        MlflowClient(f"http://127.0.0.1:{free_port()}").get_experiment_by_name("tiny")
    assert tracking._transient(e.value)
