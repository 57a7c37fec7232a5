"""Data-parallel training over processes with torch.distributed (gloo on CPU, nccl on GPU).

A training node with `launch.tasks` > 1 runs as that many processes of one submitit job (LocalExecutor or
Slurm; one per GPU on a GPU node). `init_from_job` reads the job's ranks through submitit's
TorchDistributedEnvironment (never torchrun inside submitit) and joins the process group.

How N processes train exactly like one at the same global batch:
- every rank takes the same global batch indices of the step and keeps its contiguous block of rows
  (`World.rows`); the global batch size must divide by the number of processes;
- every random draw of the step (crop, flip, mask, SdAE's folds) is made for the whole global batch from
  the step's generator and cut to this rank's rows (`rand_rows`, `global_rows`), so rank r sees exactly
  rows r*b..(r+1)*b-1 of what one process would see;
- after backward, one all-reduce averages the gradients and the loss over ranks (one flat buffer per step);
  the losses are means over equal-sized shards with equal mask counts, so the average is the global mean;
- parameters start identical (same seed, broadcast from rank 0 to be sure) and get identical updates, so
  EMA teachers stay identical on every rank without communication; a dBOT stage's frozen teacher is
  loaded from the same file by every rank.
Only rank 0 logs, saves state and writes outputs; the others compute gradients. Results agree with one
process within float tolerance (summation order differs), not bit for bit.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, global_batch: int) -> slice:
        """This rank's contiguous block of a global batch."""
        per = global_batch // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


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


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers (they are equal already; this makes sure)."""
    if world().size > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Inside a data-parallel step (batch_rows), the mean of a detached tensor over ranks; else t itself.
    Outside a step (pictures, probes on rank 0 alone) no collective runs, so nothing waits for other ranks."""
    if world().size == 1 or _ROWS is None:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world().size


def all_reduce_step(params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Average the gradients of `params` and the loss over ranks in one all-reduce; returns the mean loss.

    A parameter without a gradient (unused this step) is None on every rank alike and stays None.
    """
    size = world().size
    if size == 1:
        return loss
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.detach().float().reshape(1)])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))     # (casts back for non-fp32 grads)
        offset += g.numel()
    return flat[-1].to(loss.dtype)


# --- random draws of a global batch, cut to this rank's rows ---------------------------------------------
_ROWS: tuple[int, int, int] | None = None      # (start, stop, global batch) while a sharded step runs


@contextmanager
def batch_rows(rows: slice, global_batch: int):
    """Within the block, draws made through rand_rows/global_rows are those of the global batch, cut to `rows`."""
    global _ROWS
    before, _ROWS = _ROWS, (rows.start, rows.stop, global_batch)
    try:
        yield
    finally:
        _ROWS = before


def _sharded(batch: int) -> tuple[int, slice]:
    """(rows to draw, rows to keep) for a draw asked for `batch` rows."""
    if _ROWS is None or _ROWS[2] == batch:
        return batch, slice(None)
    start, stop, total = _ROWS
    if stop - start != batch:
        raise ValueError(f"a draw for {batch} rows inside a shard of {stop - start} rows of {total}")
    return total, slice(start, stop)


def rand_rows(batch: int, *shape: int, generator: torch.Generator, **kw) -> torch.Tensor:
    """torch.rand(batch, *shape): under batch_rows, this rank's rows of the global batch's draw."""
    total, keep = _sharded(batch)
    return torch.rand(total, *shape, generator=generator, **kw)[keep]


def global_rows(fn):
    """Decorator for fn(batch, ...) -> a tensor or dataclass of tensors with the batch first: under
    batch_rows it is computed for the global batch and this rank's rows are returned."""
    @functools.wraps(fn)
    def wrapper(batch: int, *args, **kw):
        total, keep = _sharded(batch)
        out = fn(total, *args, **kw)
        if keep == slice(None):
            return out
        if isinstance(out, torch.Tensor):
            return out[keep]
        return type(out)(**{k: v[keep] for k, v in vars(out).items()})
    return wrapper
