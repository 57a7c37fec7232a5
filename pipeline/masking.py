"""Maskers: pure functions of (batch size, number of patches, ratio, generator) -> a Mask."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Mask:
    ids_keep: torch.Tensor     # (B, K) indices of visible patches, in shuffled order
    ids_restore: torch.Tensor  # (B, L) inverse permutation: unshuffles [visible, masked] to grid order
    mask: torch.Tensor         # (B, L) float, 1 = hidden from the student, 0 = visible

    def to(self, device) -> "Mask":
        return Mask(self.ids_keep.to(device), self.ids_restore.to(device), self.mask.to(device))


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
