"""Targets and losses, each a (weighted) mean over masked tokens (optionally with the cls token).

Token weights are a 0/1 mask (MAE, dBOT) or real-valued (BootMAE's centre weighting); one code path,
`weighted_mean`, serves both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline import ranks


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in row-major grid order (MAE's layout)."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W)."""
    b, n, _ = patches.shape
    g = int(n ** 0.5)
    x = patches.reshape(b, g, g, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch standardisation of pixel targets (MAE's norm_pix_loss; unbiased variance)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def normalize_patches_per_channel(patches: torch.Tensor, channels: int, eps: float = 1e-6) -> torch.Tensor:
    """BootMAE's pixel target: per-patch standardisation done separately for each colour channel.

    patches (B, L, p*p*C) in `patchify`'s layout, where the channel is the fastest-varying index.
    """
    b, n, d = patches.shape
    per_channel = patches.reshape(b, n, d // channels, channels).transpose(-1, -2)   # (B, L, C, p*p)
    return normalize_patches(per_channel, eps).transpose(-1, -2).reshape(b, n, d)


def standardize_tokens(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token standardisation over channels: the "layer norm without affine" that BootMAE, SdAE
    and dBOT apply to feature targets (and BootMAE/SdAE to predictions)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def center_weights(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """BootMAE's centre weighting (`--weight_mask`): a masked token weighs 1 + the masked share of its 3x3
    neighbourhood (itself included, cells outside the grid count as visible, i.e. always divided by 9),
    so in [1 + 1/9, 2]: tokens deep inside a masked block weigh more than those on its edge. Visible
    tokens weigh 0. mask (B, L) float, 1 = masked, tokens in row-major grid order -> weights (B, L)."""
    grid_mask = mask.reshape(-1, 1, grid, grid)
    share = F.avg_pool2d(grid_mask, 3, stride=1, padding=1, count_include_pad=True)
    return ((1 + share) * grid_mask).reshape(mask.shape)


def weighted_mean(per_token: torch.Tensor, weights: torch.Tensor, eps: float = 1e-8,
                  count: torch.Tensor | None = None) -> torch.Tensor:
    """sum(per_token * weights) / sum(count); per_token, weights, count (B, L); count defaults to the weights.
    All-zero weights give 0. BootMAE's official loss passes its 0/1 mask as count: the centre-weighted
    errors are divided by the number of masked tokens (run_pretraining.py:L450 and L459 of LightDXY/BootMAE:
    mean(weight * err) / mean(mask)), not by the sum of the weights.

    Data-parallel: the denominator is the mean over processes of their sums, so the processes'
    average (what their averaged gradients follow) is the global batch's weighted mean even when the
    weights per sample differ (BootMAE's centre weights)."""
    denominator = (weights if count is None else count).sum().detach()
    return (per_token * weights).sum() / ranks.mean_over_ranks(denominator).clamp_min(eps)


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per_token (B, L) over the tokens where the 0/1 mask (B, L) is 1."""
    return weighted_mean(per_token, mask)


def mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
        count: torch.Tensor | None = None) -> torch.Tensor:
    """pred, target (B, L, D); weights (B, L): a 0/1 mask or real weights. Per-token MSE, weighted mean
    (divided by the sum of `count` instead of the weights when given, see weighted_mean)."""
    return weighted_mean(((pred.float() - target.float()) ** 2).mean(dim=-1), weights, count=count)


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, beta: float) -> torch.Tensor:
    """Huber loss with threshold beta, mean over channels, weighted mean over tokens (weights as in `mse`)."""
    per = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=beta).mean(dim=-1)
    return weighted_mean(per, weights)


def cosine_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                axis: str = "channels") -> torch.Tensor:
    """1 - cosine similarity of pred and target (B, N, D); weights (B, N): a 0/1 mask or real weights.

    axis="channels": cosine per token across channels, then the weighted mean over tokens.
    axis="tokens": SdAE's repository quirk, cosine along dim=1 of its (B, N_masked, D) tensors, i.e.
    per channel across the tokens, giving (B, D), averaged over batch and channels. Here the tokens
    with weight > 0 play the part of SdAE's masked tokens (the others are zeroed, which drops them
    from the dot product and both norms exactly); the weight values themselves are ignored.
    """
    pred, target = pred.float(), target.float()
    if axis == "channels":
        return weighted_mean(1 - F.cosine_similarity(pred, target, dim=-1), weights)
    if axis == "tokens":
        keep = (weights > 0).to(pred.dtype)[..., None]
        return (1 - F.cosine_similarity(pred * keep, target * keep, dim=1)).mean()
    raise ValueError(f"cosine_loss axis must be 'channels' or 'tokens', got {axis!r}")


def ramp(step: int, total_steps: int, ramp_fraction: float, start: float = 0.0, end: float = 1.0) -> float:
    """A loss weight going linearly from start to end over the first ramp_fraction of training, then
    constant at end (BootMAE's feature-loss weight: 0 -> 1 over the first 25%). Fraction 0 -> always end."""
    ramp_steps = ramp_fraction * total_steps
    if ramp_steps <= 0:
        return end
    return start + (end - start) * min(step / ramp_steps, 1.0)


def epoch_ramp(epoch: int, epochs: int, ramp_fraction: float, end: float = 1.0) -> float:
    """A loss weight set once per epoch: min(end * (epoch + 1) / (ramp_fraction * epochs), end), so it reaches
    end after the first ramp_fraction of the epochs and is already end / (ramp_fraction * epochs) in epoch 0.
    BootMAE's feature-loss weight with ramp_fraction 0.25: min(4 w (e + 1) / E, w) (run_pretraining.py:L386-387
    of LightDXY/BootMAE). Fraction 0 -> always end."""
    if ramp_fraction * epochs <= 0:
        return end
    return min(end * (epoch + 1) / (ramp_fraction * epochs), end)


def with_cls(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) patch mask -> (B, 1+L) with the cls slot counted (dBOT's loss includes cls)."""
    return torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
