"""Data-parallel training (pipeline/train/distributed.py): N processes at the same global batch train like one.

- every method through the engine, in a real 2-process gloo group (tests/data_parallel.py), against the
  same training in one process: equal loss curves and final weights (incl. EMA teachers) within float
  tolerance, and the two ranks bit-identical to each other; the ranks train through DistributedDataParallel;
- the pre-training node with launch.executor=local and launch.tasks=2 (one submitit job of two tasks, each
  joining torch.distributed through TorchDistributedEnvironment) against the inline node: same weights within
  tolerance, one MLflow run, outputs written once by rank 0;
- the params checks of launch.tasks (one-line errors before any work).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cannot_start, run_cli
from data_parallel import ATOL, RTOL, assert_close_states, free_port, train_all
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pipeline import config
from pipeline.errors import PipelineError


@pytest.fixture
def gloo():
    """The process groups here use gloo: a torch built without torch.distributed cannot start them."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        cannot_start("torch.distributed with gloo is not available in this torch build")


@pytest.mark.usefixtures("gloo")
def test_two_processes_train_every_method_like_one(tmp_path):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests/data_parallel.py"), str(tmp_path)],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.set_num_threads(1)
    one = train_all(tmp_path / "one_process")
    assert set(one) == set(ranks[0]) == {"mae", "dbot", "sdae", "rcmae", "bootmae", "supervised"}
    for name, ref in one.items():
        assert ranks[0][name]["wrapped"] == ranks[1][name]["wrapped"] == ["DistributedDataParallel"], name
        assert len(ref["wrapped"]) == 1 and ref["wrapped"] != ["DistributedDataParallel"], name   # the model itself
        assert all(torch.equal(ranks[0][name]["state"][k], ranks[1][name]["state"][k]) for k in ref["state"]), name
        assert torch.allclose(ranks[0][name]["loss"], ref["loss"], atol=ATOL, rtol=RTOL), name
        assert_close_states(ranks[0][name]["state"], ref["state"], name)       # student, decoder and teacher
        assert not torch.equal(ref["loss"][0], ref["loss"][1]), name            # it did train


@pytest.mark.usefixtures("gloo")
def test_pretrain_node_with_two_local_tasks_matches_inline(workdir):
    env = {"OMP_NUM_THREADS": "1"}
    run_cli(sys.executable, "-m", "pipeline.stages.training.prepare_data", "--preset", "tiny", env=env)
    args = [sys.executable, "-m", "pipeline.stages.training.pretrain", "--preset", "tiny", "--method", "rcmae"]
    run_cli(*args, env=env)
    weights = Path("results/seed0/pretrain/rcmae/encoder.safetensors")
    inline = load_file(weights)
    inline_loss = [e["loss"]
                   for e in json.loads(Path("results/seed0/pretrain/rcmae/metrics.json").read_text())["epochs"]]
    proc = run_cli(*args, "--set", "launch.executor=local", "--set", "launch.tasks=2", env=env)
    assert "submitted as local job" in proc.stdout
    logs = {}                                   # each task's own log (submitit: <job>_<task>_log.out)
    for log in Path("results/.submitit/pretrain@seed0-rcmae").glob("*_log.out"):
        logs[int(log.name.split("_")[-2])] = log.read_text()
    assert sorted(logs) == [0, 1], sorted(logs)
    assert all(f"rank {task}/2 joined" in logs[task] for task in (0, 1)), logs
    assert_close_states(load_file(weights), inline, "rcmae node")
    loss = [e["loss"] for e in json.loads(Path("results/seed0/pretrain/rcmae/metrics.json").read_text())["epochs"]]
    assert torch.allclose(torch.tensor(loss), torch.tensor(inline_loss), atol=ATOL, rtol=RTOL)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              "tags.node = 'pretrain@seed0-rcmae'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}   # the inline run and the 2-task run


@pytest.mark.parametrize("overrides, message", [
    (["launch.tasks=2"], "launch.tasks 2 needs executor local or slurm"),
    (["launch.executor=local", "launch.tasks=3"], "pretrain.batch_size 128 does not divide by launch.tasks 3"),
    (["launch.executor=slurm", "launch.tasks=2", "launch.slurm.gpus_per_node=4"],
     "must equal launch.slurm.gpus_per_node 4"),
])
def test_launch_tasks_params_are_checked(overrides, message):
    with pytest.raises(PipelineError, match=message):
        config.load("tiny", overrides)
