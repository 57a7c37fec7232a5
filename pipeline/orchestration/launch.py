"""submitit launcher: every compute node runs its work through `run`, on the executor in params.launch.

- inline: in this process (default; what the tests use);
- local:  a submitit LocalExecutor subprocess (same code path as a cluster job, on this machine);
- slurm:  a Slurm job with the partition, account, GPUs, CPUs, memory, time limit and setup lines of
  params.launch.slurm. On preemption or time-out submitit calls NodeJob.checkpoint(), which resubmits
  the same call; the training engine then resumes from its last saved state (results/.resume/).
  A job requeued by Slurm itself (`scontrol requeue`, preemption in REQUEUE mode) reruns the same call too.

A training node (pretrain, pretrain_dbot, supervised) with launch.tasks N > 1 is one job of N tasks (local
or Slurm): each task joins torch.distributed through pipeline.train.distributed.init_from_job and trains its
share of the global batch; rank 0's return value is the node's. Evaluation nodes always run one task.

What the submitting process does on a real cluster (seen on tests/slurm_cluster.py's cluster): it waits for
the job (submitit polls sacct), prints the job's log when it ends, and turns every way a job can fail into
one PipelineError line: a refused sbatch (e.g. more CPUs or memory than a node has), an exception in the job,
a job that ended without a result (cancelled, out of memory, timed out too often). Interrupted itself
(Ctrl-C, or SIGTERM from Snakemake or a shell's `timeout`), it cancels its job, so no job is left running
unwatched. In a job whose CPUs Slurm does not bind (no task/affinity or cgroups), torch would start one
thread per core of the node; the job then takes the --cpus-per-task it was given, unless OMP_NUM_THREADS is set.
"""
from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import submitit

from pipeline.errors import PipelineError
from pipeline.layout import RESULTS
from pipeline.train import distributed


class NodeJob(submitit.helpers.Checkpointable):
    """A picklable call of a stage's work function, run in the working directory it was made in.

    checkpoint() (inherited) resubmits this same call on preemption/time-out; resuming is the engine's job.
    """

    def __init__(self, fn: Callable, params: dict, args, tasks: int = 1):
        self.fn, self.params, self.args, self.cwd, self.tasks = fn, params, args, os.getcwd(), tasks

    def __call__(self):
        import torch

        os.chdir(self.cwd)
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if "OMP_NUM_THREADS" not in os.environ:
            if cpus:                                          # a Slurm job: use the CPUs it was given
                torch.set_num_threads(int(cpus))
            elif self.tasks > 1:                              # local tasks share this machine's cores
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.tasks))
        if self.tasks == 1:
            return self.fn(self.params, self.args)
        distributed.init_from_job()
        try:
            return self.fn(self.params, self.args)
        finally:
            distributed.shutdown()


def slurm_parameters(launch: dict, name: str, tasks: int = 1) -> dict:
    """AutoExecutor parameters of a Slurm job from params.launch.slurm: `tasks` tasks, spread evenly over
    launch.slurm.nodes nodes (one node for a one-task job: evaluation nodes)."""
    s = launch["slurm"]
    nodes = s["nodes"] if tasks > 1 else 1
    p = dict(name=name, nodes=nodes, tasks_per_node=tasks // nodes, gpus_per_node=s["gpus_per_node"],
             cpus_per_task=s["cpus_per_task"], mem_gb=s["mem_gb"], timeout_min=s["timeout_min"], slurm_setup=s["setup"])
    p.update({key: s[k] for key, k in (("slurm_partition", "partition"), ("slurm_account", "account")) if s[k]})
    return p


def make_executor(launch: dict, folder: Path, name: str, tasks: int = 1):
    if launch["executor"] == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=launch["slurm"]["timeout_min"], tasks_per_node=tasks)
        return ex
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(**slurm_parameters(launch, name, tasks))
    return ex


def _error_line(text: str) -> str:
    """The exception line of a failed job's traceback, e.g. 'PipelineError: bad input'."""
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", ln.strip())]
    return lines[-1].removeprefix("pipeline.errors.") if lines else text.strip().splitlines()[0]


def _resources(launch: dict, tasks: int) -> str:
    s = launch["slurm"]
    nodes = s["nodes"] if tasks > 1 else 1                 # as slurm_parameters asks
    return (f"launch.slurm: partition {s['partition'] or 'default'}, nodes {nodes} x {tasks // nodes} "
            f"tasks, cpus_per_task {s['cpus_per_task']}, "
            f"mem_gb {s['mem_gb']}, gpus_per_node {s['gpus_per_node']}, timeout_min {s['timeout_min']}")


@contextmanager
def _cancel_on_interrupt(job):
    """While waiting: Ctrl-C or SIGTERM (Snakemake stopping a rule, `timeout`) cancels the job, then re-raises."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt:
        print(f"interrupted: cancelling job {job.job_id}", flush=True)
        job.cancel(check=False)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run(fn: Callable, params: dict, args, node_id: str, distributed_ok: bool = False):
    """Run fn(params, args) on the configured executor and return its result (or raise its error).

    distributed_ok: the node trains data-parallel with launch.tasks processes; other nodes run one."""
    tasks = params["launch"]["tasks"] if distributed_ok else 1
    job = NodeJob(fn, params, args, tasks)
    kind = params["launch"]["executor"]
    if kind == "inline":
        return job()
    folder = RESULTS / ".submitit" / node_id
    try:
        submitted = make_executor(params["launch"], folder, node_id, tasks).submit(job)
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as e:
        where = f" ({_resources(params['launch'], tasks)})" if kind == "slurm" else ""
        raise PipelineError(f"{node_id}: could not submit the {kind} job: {_error_line(str(e))}{where}") from None
    print(f"{node_id}: submitted as {kind} job {submitted.job_id}; logs in {folder}", flush=True)
    try:
        with _cancel_on_interrupt(submitted):
            return submitted.results()[0]            # rank 0's (the only one for a one-task job)
    except submitit.core.utils.FailedJobError as e:
        raise PipelineError(f"{node_id} failed as {kind} job {submitted.job_id}: {_error_line(str(e))} "
                            f"(full log in {folder})") from None
    except submitit.core.utils.UncompletedJobError:
        raise PipelineError(f"{node_id}: {kind} job {submitted.job_id} ended without a result (state "
                            f"{submitted.state}); run the node again to resume from its saved state "
                            f"(full log in {folder})") from None
    finally:
        for stream in ("stdout", "stderr"):
            path = Path(getattr(submitted.paths, stream))     # task 0's log
            if path.is_file():
                print(path.read_text(), end="", flush=True)
