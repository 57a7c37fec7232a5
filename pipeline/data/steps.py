"""The batch of each training step: which images (a seeded order per epoch, cut in full batches) and how they are
augmented (a batched random resized crop and flip of the uint8 images, drawn from the step's generator).

Its own module, apart from the datasets, so that an edit of the augmentation or of the order is code of the nodes
that train (pipeline.train.engine, the streamed loader), not of prepare_data or the probes that read the same data.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.ranks import rand_rows

# A node's per-step draws come from seed * 1_000_003 + step (pipeline.train.engine.step_generator) and its epochs'
# orders from seed * 7_919 + epoch + 1: for every node seed b >= 10 (pipeline.config.node_seed) far above the study's
# own seeds (< 1000 per study seed) and apart from each other's. Node seed 0 (study seed 0's dBOT stage 0, which
# shares it with random_init) would draw 0, 1, 2, ...: the other nodes' seeds. It draws as STREAM_OF_SEED_0 = 999
# instead, an offset of study seed 0's block that no node has (tests/test_seeds.py records every stream of every
# training node).
STREAM_OF_SEED_0 = 999


def stream_key(seed: int) -> int:
    """The key of the node's per-step and per-epoch streams: its seed, but STREAM_OF_SEED_0 for seed 0."""
    return seed or STREAM_OF_SEED_0


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(stream_key(seed) * 7_919 + epoch + 1))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The image indices of global step `step`: the seeded order of its epoch, cut in full batches."""
    bs = min(batch_size, n)
    epoch, pos = divmod(step, n // bs)
    return epoch_order(n, seed, epoch)[pos * bs:(pos + 1) * bs]


def augment(x_uint8: torch.Tensor, generator: torch.Generator, crop_scale: tuple[float, float],
            hflip: bool) -> torch.Tensor:
    """Batched RandomResizedCrop + optional horizontal flip: uint8 (B, C, H, W) -> float32 in [0, 1], same H x W.

    Per image: area fraction s ~ U(crop_scale); log aspect ratio uniform on [log 3/4, log 4/3] narrowed to
    [log s, -log s], the ratios whose crop fits (so crop_scale (1, 1) is the identity; torchvision rejects
    and redraws instead); centre uniform over the positions inside the image; flip with probability 1/2.
    One affine_grid + bilinear grid_sample for the whole batch; every draw comes from `generator`.
    """
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise PipelineError(f"crop_scale must satisfy 0 < min <= max <= 1, got {list(crop_scale)}")
    b = x_uint8.shape[0]
    if generator.device.type != "cpu":
        raise ValueError("augment draws on a CPU generator (its crop parameters are computed on the CPU)")
    u = rand_rows(b, 5, generator=generator, dtype=torch.float64)
    log_s = (lo + (hi - lo) * u[:, 0]).log()
    r_lo, r_hi = log_s.clamp(min=math.log(3 / 4)), (-log_s).clamp(max=math.log(4 / 3))
    log_r = r_lo + (r_hi - r_lo) * u[:, 1]
    w = ((log_s + log_r) / 2).exp().clamp(max=1)          # crop width and height as fractions of W and H
    h = ((log_s - log_r) / 2).exp().clamp(max=1)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0).double() if hflip else torch.ones(b, dtype=torch.float64)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, (1 - w) * (2 * u[:, 2] - 1)
    theta[:, 1, 1], theta[:, 1, 2] = h, (1 - h) * (2 * u[:, 3] - 1)
    x = x_uint8.float() / 255
    grid = F.affine_grid(theta.float().to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
