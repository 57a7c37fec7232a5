"""Data-parallel training over processes with torch.distributed (gloo on CPU, nccl on GPU).

A training node with `launch.tasks` > 1 runs as that many processes of one submitit job (LocalExecutor or
Slurm; one per GPU on a GPU node). `init_from_job` reads the job's ranks through submitit's
TorchDistributedEnvironment (never torchrun inside submitit) and joins the process group.

How N processes train exactly like one at the same global batch:
- every rank takes the same global batch indices of the step and keeps its contiguous block of rows
  (`pipeline.ranks.World.rows`); the global batch size must divide by the number of processes;
- every random draw of the step (crop, flip, mask, SdAE's folds) is made for the whole global batch from
  the step's generator and cut to this rank's rows (pipeline.ranks), so rank r sees exactly
  rows r*b..(r+1)*b-1 of what one process would see;
- the engine trains the model through `wrap`: torch's DistributedDataParallel, which averages the gradients
  over ranks in buckets, each all-reduced as soon as backward has filled it (overlapped with the rest of
  backward); the losses are means over equal-sized shards with equal mask counts, so the average is the
  global mean. The epoch's loss sum is averaged over ranks once, at the epoch end (`average`);
- parameters start identical (same seed; DDP broadcasts rank 0's parameters, frozen teachers' included,
  and buffers when it wraps the model) and get identical updates, so EMA teachers stay identical on every
  rank without communication; a dBOT stage's frozen teacher is loaded from the same file by every rank.
Only rank 0 logs, saves state and writes outputs; the others compute gradients. Results agree with one
process within float tolerance (summation order differs), not bit for bit.

Several nodes: pipeline.orchestration.launch asks Slurm for launch.slurm.nodes nodes with launch.tasks / nodes
tasks each (on GPUs launch.tasks = gpus_per_node x nodes: one task per GPU). submitit's
TorchDistributedEnvironment takes every task's rank and the world size from Slurm's variables and MASTER_ADDR
from the job's first host, each task sees only its GPU (CUDA_VISIBLE_DEVICES = its local rank) and the group
uses nccl. Every node must see the same file system: every rank reads the data and the resume state there.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.ranks import World, world


def init_from_job() -> World:
    """Join the process group of a multi-task submitit job (no-op for a one-task job); returns the world."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1 or dist.is_initialized():
        return world()
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=torch.cuda.is_available(), overwrite=True)
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    print(f"rank {dist_env.rank}/{dist_env.world_size} joined {dist_env.master_addr}:{dist_env.master_port}",
          flush=True)
    return world()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: str) -> nn.Module:
    """The module to train `model` through: torch's DistributedDataParallel over this world's processes, or
    `model` itself in one process. Call it on every rank once the model is on `device` and any saved state is
    loaded: DDP broadcasts rank 0's parameters and buffers when it wraps the model, never again
    (forward_sync_buffers=False: the methods' buffers are constants, EMA teachers follow identical students).
    Every trainable parameter gets a gradient in every step of every method, so DDP does not search the graph
    for unused ones (find_unused_parameters=False). Call the model's own methods and state_dict on
    `unwrap(wrapped)`; only the forward goes through DDP."""
    if world().size == 1:
        return model
    dev = torch.device(device)
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False, gradient_as_bucket_view=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a `wrap`ped one (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def average(t: torch.Tensor) -> torch.Tensor:
    """The mean of a detached tensor over all ranks (every rank must call it); t itself in one process."""
    if world().size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world().size


def weights_finite(module: nn.Module) -> bool:
    """Whether every parameter of `module` is finite. One rank alone knows only its own losses; a non-finite
    loss on another rank shows up in the shared weights (its gradients are averaged into every rank's)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in module.parameters()]).all())
