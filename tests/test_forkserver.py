"""Warm node start (pipeline.orchestration.forkserver): a node run by the server's child writes what a cold process
writes, exits with its status, forwards signals, dies with its node process or its server, and runs cold wherever a
child would not run like a fresh process."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_dag, run_cli

from pipeline.dag import stage_module

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the fork server is Linux only")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for these tests, started in a copy of the DAG files (its working directory, and theirs)
    where prepare_data has run; yields (server process, the environment that points a node to it)."""
    from pipeline.orchestration import forkserver

    root = copy_dag(tmp_path_factory.mktemp("warm"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        proc, path = forkserver.start(parent=os.getpid(), idle_s=300)
        node("prepare_data")
        yield proc, {forkserver.ENV: path}
        forkserver.stop(proc, path)


def node(*args, env=None, check=True):
    return run_cli(sys.executable, "-m", stage_module(args[0]), "--preset", "tiny", *args[1:], env=env, check=check)


def children(pid: int) -> list[int]:
    """Processes whose parent is pid."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
        except (OSError, IndexError):
            pass
    return out


def wait_for(condition, timeout=60.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_warm_node_writes_what_a_cold_node_writes(server, tmp_path_factory, monkeypatch):
    from pipeline.orchestration import forkserver

    _, warm = server
    warm_dir = Path.cwd()
    cold_dir = copy_dag(tmp_path_factory.mktemp("cold"))
    shutil.copytree(warm_dir / "results/prepare_data", cold_dir / "results/prepare_data")
    out = node("pretrain", "--seed", "0", "--method", "mae", env=warm)
    assert "starts cold" not in out.stderr
    monkeypatch.chdir(cold_dir)
    node("pretrain", "--seed", "0", "--method", "mae",
         env={"MLFLOW_TRACKING_URI": f"sqlite:///{cold_dir}/mlflow.db", forkserver.ENV: ""})    # cold
    encoder = "results/seed0/pretrain/mae/encoder.safetensors"
    assert (warm_dir / encoder).read_bytes() == (cold_dir / encoder).read_bytes()
    from mlflow import MlflowClient

    losses = []
    for root in (warm_dir, cold_dir):
        client = MlflowClient(f"sqlite:///{root}/mlflow.db")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  "tags.node = 'pretrain@seed0-mae'")
        losses.append([r.data.metrics["final_loss"] for r in runs])
    assert losses[0] == losses[1] and len(losses[0]) == 1


def test_a_warm_node_exits_with_its_status_and_error_line(server):
    _, warm = server
    proc = node("knn", "--seed", "0", "--weights", "mae", "--set", "knn.k=0", env=warm, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")
    assert "starts cold" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_child_starts_with_the_preloaded_heap_frozen_and_what_every_node_imports(server, tmp_path):
    """What keeps a warm node cheap (measured on the tiny study: docs/performance.md): the server's heap is out of the
    child's garbage collections (gc.freeze), and what nodes import at exit (tabulate, by torch._dynamo) is loaded."""
    _, warm = server
    (tmp_path / "heap_probe.py").write_text("import gc, sys\nprint(gc.get_freeze_count(), 'tabulate' in sys.modules)\n")
    ask = "import sys; from pipeline.orchestration import forkserver; sys.exit(forkserver.delegate('heap_probe', []))"
    proc = run_cli(sys.executable, "-c", ask, cwd=tmp_path, env=warm)
    assert "starts cold" not in proc.stderr
    frozen, tabulate = proc.stdout.split()
    assert int(frozen) > 100_000 and tabulate == "True", proc.stdout


def test_a_node_whose_start_up_environment_differs_runs_cold(server):
    _, warm = server
    proc = node("knn", "--help", env={**warm, "ATEN_CPU_CAPABILITY": "default"})
    assert "starts cold: $ATEN_CPU_CAPABILITY differs" in proc.stderr and "usage:" in proc.stdout


def test_a_broken_request_leaves_the_server_serving(server):
    import socket

    _, warm = server
    for junk in (b"not json\n", b'{"module": "x"}\n', b""):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(next(iter(warm.values())))
            conn.sendall(junk)
    proc = node("knn", "--help", env=warm)
    assert "usage:" in proc.stdout and "starts cold" not in proc.stderr


def test_a_node_process_gone_before_the_reply_leaves_no_child_running(server, tmp_path):
    """A node process killed between its request and the server's reply (a SIGKILL right after it starts) never
    learns its child's pid: the server kills that child, which would otherwise run on, unseen, holding the node's
    lock and writing its outputs."""
    proc, warm = server
    (tmp_path / "late_probe.py").write_text("import time\ntime.sleep(1.5)\nopen('ran', 'w').close()\n")
    ask = ("import os, socket; from pipeline.orchestration import forkserver\n"
           "conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
           "conn.connect(os.environ[forkserver.ENV])\n"
           "forkserver._send(conn, forkserver._request('late_probe', []), fds=[0, 1, 2])\n"
           "conn.close()   # gone before the reply\n")
    run_cli(sys.executable, "-c", ask, cwd=tmp_path, env=warm)
    time.sleep(3.0)                                      # the probe's child would have written by now
    assert not (tmp_path / "ran").exists(), "the child of a request whose node process was gone ran on"
    assert not children(proc.pid)
    assert "usage:" in node("knn", "--help", env=warm).stdout


def start_long_node(warm: dict) -> subprocess.Popen:
    """A pre-training node that runs for minutes (SdAE: its resume state stays apart from the MAE node's), as a
    process of its own: the fork server's client."""
    env = dict(os.environ, **warm, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = [sys.executable, "-m", "pipeline.stages.training.pretrain", "--preset", "tiny", "--seed", "0",
           "--method", "sdae", "--set", "pretrain.epochs=10000"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_node_process_reaches_the_node(server, sig):
    """SIGTERM is forwarded (the node dies of it, and so does its process); after a SIGKILL, which cannot be
    forwarded, the server kills the child when the node process's connection closes. The server serves on."""
    proc, warm = server
    client = start_long_node(warm)
    wait_for(lambda: len(children(proc.pid)) == 1)
    child = children(proc.pid)[0]
    time.sleep(1.0)                                      # into its work
    os.kill(client.pid, sig)
    assert client.wait(30) == -sig
    wait_for(lambda: child not in children(proc.pid), timeout=10)
    assert proc.poll() is None and "usage:" in node("knn", "--help", env=warm).stdout


def test_a_node_dies_with_its_server(server):
    """Last: it kills the module's server."""
    proc, warm = server
    client = start_long_node(warm)
    wait_for(lambda: len(children(proc.pid)) == 1)
    child = children(proc.pid)[0]
    proc.kill()
    assert client.wait(30) == 1                          # "the fork server stopped while this node ran"
    wait_for(lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2],
             timeout=10)
