"""pipeline.train.distributed's job set-up (init_from_job, shutdown, weights_finite) and the data loader's worker
guard (pipeline.data.stream._die_with_parent), called in-process.

tests/test_distributed.py runs them in real multi-process jobs (node processes, a 2-process gloo group); these
tests check each function's contract in this process, where a coverage tool (mutmut's) sees it: the submitit
job a multi-task node runs in is made of the variables submitit's LocalExecutor sets, and the process group
either a real one-process gloo group or a recorded call (a real two-rank join needs two processes: see
tests/test_distributed.py)."""
import ctypes
import io
import os
import select
import signal
import socket
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pipeline.data import stream
from pipeline.ranks import World
from pipeline.train import distributed

INIT_PROCESS_GROUP = dist.init_process_group          # the real one (the job fixture records calls instead)
TORCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def job(monkeypatch):
    """The environment of task 1 of a 2-task submitit LocalExecutor job, with stale torch.distributed variables
    (a job started from another job): returns the recorded calls to dist.init_process_group. Every variable
    is restored after the test."""
    for key, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2",
                       "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0",
                       "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1"}.items():
        monkeypatch.setenv(key, value)
    for key in TORCH_ENV:
        monkeypatch.setenv(key, "7")                       # stale: the job's own values replace them
    monkeypatch.setenv("MASTER_PORT", "29517")             # submitit keeps a port it is given
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")         # recorded as it was (unset), so the value the GPU test's
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")             # job sets is undone too (a delenv of an unset one is not)
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert not dist.is_initialized()
    return calls


def one_process_group():
    INIT_PROCESS_GROUP("gloo", store=dist.HashStore(), rank=0, world_size=1)


def test_a_multi_task_job_exports_its_ranks_and_joins_with_gloo_on_the_cpu(job, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert isinstance(distributed.init_from_job(), World)
    assert job == [((), {"backend": "gloo"})]
    assert {k: os.environ[k] for k in TORCH_ENV} == {
        "MASTER_ADDR": socket.gethostname(), "MASTER_PORT": "29517", "RANK": "1", "WORLD_SIZE": "2",
        "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert "CUDA_VISIBLE_DEVICES" not in os.environ         # a CPU job leaves the devices alone
    assert capsys.readouterr().out == f"rank 1/2 joined {socket.gethostname()}:29517\n"


def test_the_joined_line_is_flushed_at_once(job, monkeypatch):
    """A task that hangs after joining (waiting for the others) still shows the line in its job log."""
    class Log(io.StringIO):
        flushed = ""

        def flush(self):
            Log.flushed = self.getvalue()
    monkeypatch.setattr(sys, "stdout", Log())
    distributed.init_from_job()
    assert Log.flushed.startswith("rank 1/2 joined ")


def test_a_multi_task_job_on_gpus_sees_its_own_gpu_and_joins_with_nccl(job, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    distributed.init_from_job()
    assert job == [((), {"backend": "nccl"})]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1" and os.environ["RANK"] == "1"     # its local rank's GPU
    assert capsys.readouterr().out.startswith("rank 1/2 joined ")


def test_a_one_task_job_joins_no_group(job, monkeypatch, capsys):
    monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "1")
    assert distributed.init_from_job() == World(0, 1)
    assert job == [] and os.environ["RANK"] == "7" and capsys.readouterr().out == ""


def test_a_process_already_in_a_group_does_not_join_again(job, capsys):
    one_process_group()
    try:
        assert distributed.init_from_job() == World(0, 1)
        assert job == [] and os.environ["RANK"] == "7" and capsys.readouterr().out == ""
    finally:
        dist.destroy_process_group()


def test_init_from_job_needs_a_submitit_job(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    with pytest.raises(RuntimeError):
        distributed.init_from_job()


def test_shutdown_leaves_the_group_and_is_a_no_op_outside_one():
    distributed.shutdown()                                  # no group: nothing to leave, no error
    one_process_group()
    assert dist.is_initialized()
    distributed.shutdown()
    assert not dist.is_initialized()
    distributed.shutdown()


def test_weights_finite_looks_at_every_parameter():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    assert distributed.weights_finite(model) is True
    for bad in (float("nan"), float("inf"), -float("inf")):
        with torch.no_grad():
            model[1].bias[1] = bad                          # one value of the last parameter
        assert distributed.weights_finite(model) is False
    with torch.no_grad():
        model[1].bias[1] = 0.0
        model[0].weight[0, 0] = float("nan")                # and of the first
    assert distributed.weights_finite(model) is False


# ---- stream._die_with_parent: a data loader worker ends with the node's process ----

linux = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
PR_SET_PDEATHSIG, PR_GET_PDEATHSIG = 1, 2


def death_signal() -> int:
    sig = ctypes.c_int(-1)
    assert ctypes.CDLL(None).prctl(PR_GET_PDEATHSIG, ctypes.byref(sig)) == 0
    return sig.value


@pytest.fixture
def keep_death_signal():
    """_die_with_parent sets this (test) process's parent-death signal: put the one it had back after."""
    before = death_signal()
    yield
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, before)


class Exited(Exception):
    pass


@pytest.fixture
def exits(monkeypatch):
    """os._exit raises Exited(status) instead of ending this process."""
    def _exit(status):
        raise Exited(status)
    monkeypatch.setattr(os, "_exit", _exit)


@linux
@pytest.mark.usefixtures("keep_death_signal", "exits")
def test_a_worker_of_a_live_parent_gets_sigkill_when_it_dies():
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, 0)
    stream._die_with_parent(os.getppid(), 3)               # the worker's parent: this process's own, alive
    assert death_signal() == signal.SIGKILL


@linux
@pytest.mark.usefixtures("keep_death_signal", "exits")
def test_a_worker_whose_parent_died_already_exits_at_once_and_cleanly():
    with pytest.raises(Exited) as e:
        stream._die_with_parent(os.getppid() + 1 if os.getppid() != 1 else 2, 0)   # not its parent any more
    assert e.value.args == (0,)


@pytest.mark.usefixtures("exits")
def test_other_systems_have_no_parent_death_signal(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    called = []
    monkeypatch.setattr(ctypes, "CDLL", lambda *a: called.append(a))
    stream._die_with_parent(os.getppid() + 1, 0)            # no prctl, and no exit
    assert called == []


@linux
def test_a_worker_is_killed_when_its_parent_is():
    """The real thing: a worker (grandchild) set up by _die_with_parent dies when its parent is SIGKILLed."""
    read, write = os.pipe()
    parent = os.fork()
    if parent == 0:                                         # the node's process
        os.close(read)
        worker = os.fork()
        if worker == 0:
            try:
                stream._die_with_parent(os.getppid(), 0)
                os.write(write, b"up\n")
                while True:                                 # holds `write` open as long as it lives
                    signal.pause()
            finally:
                os._exit(1)
        os.close(write)
        signal.pause()                                      # until SIGKILLed
        os._exit(1)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        assert pipe.readline() == b"up\n"                  # the worker is set up
        os.kill(parent, signal.SIGKILL)
        os.waitpid(parent, 0)
        assert select.select([pipe], [], [], 10)[0], "the worker outlived its parent"
        assert pipe.read() == b""                           # every writer is gone: the worker is dead too


def test_wrap_gives_ddp_the_model_its_device_and_the_documented_flags(monkeypatch):
    """One process: the model itself. Several: DistributedDataParallel over the model with the device it trains on
    (none on the CPU; cuda:N -> [N]; plain cuda -> the current device), without buffer syncs in the forward and with
    gradients as views of the buckets (recorded: a real multi-GPU DDP needs the GPUs; tests/test_distributed.py
    trains through a real two-process one on the CPU)."""
    made = []
    monkeypatch.setattr(distributed, "DistributedDataParallel", lambda module, **kw: made.append((module, kw)) or "ddp")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    model = nn.Linear(2, 2)
    assert distributed.wrap(model, "cpu") is model and not made
    monkeypatch.setattr(distributed, "world", lambda: World(0, 2))
    for device, ids in (("cpu", None), ("cuda:1", [1]), ("cuda", [3])):
        assert distributed.wrap(model, device) == "ddp"
        assert made[-1] == (model, {"device_ids": ids, "forward_sync_buffers": False, "gradient_as_bucket_view": True})
