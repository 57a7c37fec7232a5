"""submitit launcher: every compute node runs its work through `run`, on the executor in params.launch.

- inline: in this process (default; what the tests use);
- local:  a submitit LocalExecutor subprocess (same code path as a cluster job, on this machine);
- slurm:  a Slurm job with the partition, account, GPUs, CPUs, memory, time limit and setup lines of
  params.launch.slurm. On preemption or time-out submitit calls NodeJob.checkpoint(), which resubmits
  the same call; the training engine then resumes from its last saved state (results/.resume/).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import submitit

from pipeline.errors import PipelineError
from pipeline.layout import RESULTS


class NodeJob(submitit.helpers.Checkpointable):
    """A picklable call of a stage's work function, run in the working directory it was made in.

    checkpoint() (inherited) resubmits this same call on preemption/time-out; resuming is the engine's job.
    """

    def __init__(self, fn: Callable, params: dict, args):
        self.fn, self.params, self.args, self.cwd = fn, params, args, os.getcwd()

    def __call__(self):
        os.chdir(self.cwd)
        return self.fn(self.params, self.args)


def slurm_parameters(launch: dict, name: str) -> dict:
    """AutoExecutor parameters of a Slurm job from params.launch.slurm: one task, one node (for now)."""
    s = launch["slurm"]
    p = dict(name=name, nodes=1, tasks_per_node=1, gpus_per_node=s["gpus_per_node"], cpus_per_task=s["cpus_per_task"],
             mem_gb=s["mem_gb"], timeout_min=s["timeout_min"], slurm_setup=s["setup"])
    p.update({key: s[k] for key, k in (("slurm_partition", "partition"), ("slurm_account", "account")) if s[k]})
    return p


def make_executor(launch: dict, folder: Path, name: str):
    if launch["executor"] == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=launch["slurm"]["timeout_min"])
        return ex
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(**slurm_parameters(launch, name))
    return ex


def _error_line(text: str) -> str:
    """The exception line of a failed job's traceback, e.g. 'PipelineError: bad input'."""
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", ln.strip())]
    return lines[-1].removeprefix("pipeline.errors.") if lines else text.strip().splitlines()[0]


def run(fn: Callable, params: dict, args, node_id: str):
    """Run fn(params, args) on the configured executor and return its result (or raise its error)."""
    job = NodeJob(fn, params, args)
    kind = params["launch"]["executor"]
    if kind == "inline":
        return job()
    folder = RESULTS / ".submitit" / node_id
    submitted = make_executor(params["launch"], folder, node_id).submit(job)
    print(f"{node_id}: submitted as {kind} job {submitted.job_id}; logs in {folder}", flush=True)
    try:
        return submitted.result()
    except submitit.core.utils.FailedJobError as e:
        raise PipelineError(f"{node_id} failed as {kind} job {submitted.job_id}: {_error_line(str(e))} "
                            f"(full log in {folder})") from None
    finally:
        for stream in ("stdout", "stderr"):
            path = Path(getattr(submitted.paths, stream))
            if path.is_file():
                print(path.read_text(), end="", flush=True)
