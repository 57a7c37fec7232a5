"""Maskers: pure functions of (batch size, number of patches, ratio, generator) -> a Mask.

Random (MAE), block-wise (BEiT) and hybrid (BootMAE) maskers, and SdAE's multi-fold split of a Mask. Every
random draw comes from the generator, so the same seed gives the same mask; all are vectorised over the batch
(block masking loops over a bounded number of attempts, never over samples). In a data-parallel step each
process gets its rows of the global batch's masks (pipeline.ranks.batch_rows)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.ranks import global_rows, rand_rows


@dataclass
class Mask:
    ids_keep: torch.Tensor     # (B, K) indices of visible patches, in shuffled order
    ids_restore: torch.Tensor  # (B, L) inverse permutation: unshuffles [visible, masked] to grid order
    mask: torch.Tensor         # (B, L) float, 1 = hidden from the student, 0 = visible

    def to(self, device) -> Mask:
        return Mask(self.ids_keep.to(device), self.ids_restore.to(device), self.mask.to(device))


@global_rows
def random_masking(batch: int, num_patches: int, ratio: float, generator: torch.Generator) -> Mask:
    """MAE's per-sample random masking: keep the floor(L * (1 - ratio)) patches of lowest noise."""
    keep = int(num_patches * (1 - ratio))
    noise = torch.rand(batch, num_patches, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Mask(ids_shuffle[:, :keep], ids_restore, mask)


def mask_from_bool(hidden: torch.Tensor) -> Mask:
    """(B, L) bool, True = hidden, the same count per row -> Mask (visible, then hidden, each by grid index)."""
    counts = hidden.sum(dim=1)
    if (counts != counts[0]).any():
        raise ValueError(f"every row needs the same number of hidden patches, got {sorted(set(counts.tolist()))}")
    ids_shuffle = torch.argsort(hidden.to(torch.uint8), dim=1, stable=True)
    keep = hidden.shape[1] - int(counts[0])
    return Mask(ids_shuffle[:, :keep], torch.argsort(ids_shuffle, dim=1), hidden.float())


# Safety bound of block_masking_grid(max_attempts=None): far beyond what any grid here needs (a 7x7 grid at
# batch 4096 finishes in a few hundred attempts), it turns an impossible request into an error, not a hang.
EXACT_ATTEMPTS = 100_000


def block_masking_grid(batch: int, grid: int, num_masked: int, generator: torch.Generator, min_block: int = 16,
                       aspect: tuple[float, float] = (0.3, 1 / 0.3), max_attempts: int | None = 64,
                       max_block: int | None = None) -> torch.Tensor:
    """BEiT's block-wise masking, (B, grid*grid) bool with at most num_masked True per row.

    Each attempt draws, for every sample, a rectangle of area uniform in [min(min_block, cap), cap], where
    cap = min(remaining, max_block) (max_block None: the remaining count), and log-uniform aspect ratio in
    `aspect` (sides rounded, clamped to [1, grid]) at a random position; it is accepted only if it hides
    between 1 and cap new patches (BEiT's rule, masking_generator.py:L59 and L69 of LightDXY/BootMAE, whose
    run_pretraining.py:L67 caps a block at 60 of 196 patches). max_attempts None: attempts go on until every
    row has exactly num_masked hidden (BEiT's generator redraws until a block adds patches and adds blocks
    until the count is reached, masking_generator.py:L58 and L83); RuntimeError after EXACT_ATTEMPTS.
    max_attempts k: after k attempts a row may still be short of num_masked.

    Left as it was: when fewer than min_block patches remain, the area is drawn in [cap, cap] here and in
    [cap, min_block] there; and BEiT rejects a side equal to the grid's (L63), where here it is allowed.
    """
    rows = torch.arange(grid)
    hidden = torch.zeros(batch, grid, grid, dtype=torch.bool)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(EXACT_ATTEMPTS if max_attempts is None else max_attempts):
        remaining = num_masked - hidden.sum(dim=(1, 2))
        if not (remaining > 0).any():
            break
        cap = remaining if max_block is None else remaining.clamp(max=max_block)
        u_area, u_aspect, u_top, u_left = torch.rand(4, batch, generator=generator, dtype=torch.float64)
        lo = cap.clamp(max=min_block)
        area = (lo + u_area * (cap - lo)).clamp(min=1)   # finished rows: any area, rejected below
        ratio = torch.exp(log_lo + u_aspect * (log_hi - log_lo))
        h = torch.sqrt(area * ratio).round().long().clamp(1, grid)
        w = torch.sqrt(area / ratio).round().long().clamp(1, grid)
        top = (u_top * (grid - h + 1)).long()
        left = (u_left * (grid - w + 1)).long()
        in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
        in_cols = (rows >= left[:, None]) & (rows < (left + w)[:, None])
        rect = in_rows[:, :, None] & in_cols[:, None, :]
        new = (rect & ~hidden).sum(dim=(1, 2))
        accept = (new > 0) & (new <= cap)
        hidden |= rect & accept[:, None, None]
    else:
        if max_attempts is None and (hidden.sum(dim=(1, 2)) < num_masked).any():
            raise RuntimeError(f"block masking did not reach {num_masked} hidden patches of a {grid}x{grid} grid "
                               f"in {EXACT_ATTEMPTS} attempts")
    return hidden.flatten(1)


def max_block_patches(share: float | None, num_patches: int) -> int | None:
    """A block cap given as a share of the patches -> patches (at least 1); None stays None (no cap).
    BEiT's 60 of 196 (share 60/196 = 0.306) is 15 of a 7x7 grid's 49."""
    return None if share is None else max(1, round(share * num_patches))


@global_rows
def hybrid_masking(batch: int, num_patches: int, ratio: float, generator: torch.Generator,
                   block_ratio: float = 0.5, min_block: int = 16, max_block: int | None = None,
                   max_attempts: int | None = 64) -> Mask:
    """BootMAE's masking: BEiT blocks hiding up to int(L * block_ratio) patches (never more than the masked
    count), then random patches among the rest, up to exactly as many hidden as `random_masking`
    (L - int(L * (1 - ratio))), since a Mask needs the same number of visible patches in every row.
    max_block (patches per block) and max_attempts: see block_masking_grid."""
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"block masking needs a square patch grid, got {num_patches} patches")
    masked = num_patches - int(num_patches * (1 - ratio))
    blocks = block_masking_grid(batch, grid, min(int(num_patches * block_ratio), masked), generator, min_block,
                                max_attempts=max_attempts, max_block=max_block)
    score = torch.rand(batch, num_patches, generator=generator).masked_fill(blocks, -1.0)  # blocks sort first
    ids = torch.argsort(score, dim=1)[:, :masked]
    return mask_from_bool(torch.zeros_like(blocks).scatter(1, ids, True))


def block_masking(batch: int, num_patches: int, ratio: float, generator: torch.Generator,
                  min_block: int = 16) -> Mask:
    """BEiT's block-wise masking with as many hidden patches as `random_masking`. BEiT's blocks may fall
    short of the target, so they are topped up with random patches to make the count exact: this is
    `hybrid_masking` with the whole masked count as the block target."""
    return hybrid_masking(batch, num_patches, ratio, generator, block_ratio=1.0, min_block=min_block)


def multifold_split(mask: Mask, folds: int, generator: torch.Generator) -> torch.Tensor:
    """SdAE's multi-fold masking: each sample's hidden patches in random order, split into `folds` disjoint
    folds of equal size -> (B, folds, masked // folds) patch indices. As in the official code, a remainder
    (masked % folds patches, drawn at random) is dropped: those patches get no teacher target. The caller
    runs each fold as its own teacher sequence: `.flatten(0, 1)` gives (B*folds, n) ids_keep for the
    encoder (images repeated)."""
    batch, num_patches = mask.ids_restore.shape
    masked = num_patches - mask.ids_keep.shape[1]
    if not 1 <= folds <= masked:
        raise ValueError(f"{masked} masked patches cannot be split into {folds} folds")
    per_fold = masked // folds
    hidden_ids = torch.argsort(mask.ids_restore, dim=1)[:, mask.ids_keep.shape[1]:]   # shuffled order, masked part
    order = torch.argsort(rand_rows(batch, masked, generator=generator), dim=1).to(hidden_ids.device)
    return torch.gather(hidden_ids, 1, order[:, :folds * per_fold]).view(batch, folds, per_fold)
