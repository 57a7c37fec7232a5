"""This process's place among the data-parallel processes of a training node, and its rows of a global batch.

Every random draw of a training step (crop, flip, mask, SdAE's folds) is made for the whole global batch from the
step's generator and cut to this rank's rows (`rand_rows`, `global_rows`), inside `batch_rows`: so rank r sees
exactly rows r*b..(r+1)*b-1 of what one process would see (pipeline.train.distributed sets the processes up).
In one process (the usual case) these are plain draws. The models and the data pipeline draw through here; this
module imports nothing of the package.
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


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Inside a data-parallel step (batch_rows), the mean of a detached tensor over ranks; else t itself.
    Outside a step (pictures, probes on rank 0 alone) no collective runs, so nothing waits for other ranks."""
    if world().size == 1 or _ROWS is None:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world().size


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
