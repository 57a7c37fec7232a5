"""A pre-training node killed with SIGKILL mid-epoch and run again ends bit-identical to an
uninterrupted run, continuing its MLflow run instead of starting a second one."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_cli
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e
ARGS = ["--preset", "tiny", "--set", "pretrain.epochs=12", "--set", "pretrain.checkpoint_every_min=0"]


def prepare(workdir):
    run_cli(sys.executable, "-m", "pipeline.stages.training.prepare_data", "--preset", "tiny")


def kill_mid_epoch(state, steps_per_epoch=11, cmd=None):
    """Run cmd (default: the tiny MAE node) and SIGKILL it once its saved state is past the first epoch, mid-epoch.
    Returns the step of the state it left (what a rerun resumes at)."""
    cmd = cmd or [sys.executable, "-m", "pipeline.stages.training.pretrain", "--method", "mae", *ARGS]
    # cold (no warm fork server): the SIGKILL must hit the process that trains. A warm node's child outlives the node
    # process until the server kills it, and may save once more after the step read below.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, MIM_FORKSERVER=""))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            step = torch.load(state, weights_only=True)["step"]
        except Exception:
            step = 0
        if step > steps_per_epoch and step % steps_per_epoch:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return torch.load(state, weights_only=True)["step"]     # it may have saved once more meanwhile
        time.sleep(0.02)
    proc.kill()
    pytest.fail("the run ended before it could be killed mid-epoch")


def test_sigkill_mid_epoch_then_rerun_is_bit_identical(workdir, tmp_path_factory):
    prepare(workdir)
    state = workdir / "results/.resume/pretrain@seed0-mae/state.pt"
    killed_at = kill_mid_epoch(state)
    assert not (workdir / "results/seed0/pretrain/mae/encoder.safetensors").exists()
    rerun = run_cli(sys.executable, "-m", "pipeline.stages.training.pretrain", "--method", "mae", *ARGS)
    assert f"pretrain@seed0-mae/state.pt at step {killed_at}" in rerun.stderr, rerun.stderr[-2000:]
    resumed = load_file(workdir / "results/seed0/pretrain/mae/encoder.safetensors")

    os.rename(workdir / "results/seed0/pretrain", workdir / "results/seed0/pretrain_killed")
    run_cli(sys.executable, "-m", "pipeline.stages.training.pretrain", "--method", "mae", *ARGS,
            env={"MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/other.db"})
    reference = load_file(workdir / "results/seed0/pretrain/mae/encoder.safetensors")
    assert killed_at > 0 and resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              "attributes.run_name = 'pretrain@seed0-mae'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # every epoch logged once: the rerun trained only the epochs the killed run had not finished
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")) == list(range(12))


def test_a_killed_node_rerun_after_an_edit_of_its_code_starts_fresh(workdir):
    """The resumable state is keyed by the node's code (its fingerprint's modules) as well as its params: after an
    edit of a module the node runs (here a statement added to the copy's MAE module, which the node imports from the
    working directory), the rerun trains from step 0 in a new MLflow run, not on from weights the old code trained."""
    prepare(workdir)
    args = ["--preset", "tiny", "--set", "pretrain.epochs=2", "--set", "pretrain.checkpoint_every_min=0"]
    cmd = [sys.executable, "-m", "pipeline.stages.training.pretrain", "--method", "mae", *args]
    state = workdir / "results/.resume/pretrain@seed0-mae/state.pt"
    killed_at = kill_mid_epoch(state, cmd=cmd)
    mae = workdir / "pipeline/methods/mae.py"
    mae.write_text(mae.read_text() + "\nEDITED = True\n")
    rerun = run_cli(*cmd)
    assert killed_at > 0 and "not resuming" in rerun.stderr and "at step" not in rerun.stderr, rerun.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              "attributes.run_name = 'pretrain@seed0-mae'")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(runs) == 2 and len(finished) == 1         # the killed run's, and the fresh one
    assert sorted(m.step for m in client.get_metric_history(finished[0].info.run_id, "loss")) == [0, 1]
