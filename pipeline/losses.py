"""Targets and losses, each a mean over masked tokens (optionally with the cls token)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def standardize_tokens(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token standardisation over channels: layer norm without affine parameters."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per_token (B, L) over the tokens where mask (B, L) is 1."""
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred, target (B, L, D); mask (B, L). Mean squared error per token, averaged over masked tokens."""
    return masked_mean(((pred.float() - target.float()) ** 2).mean(dim=-1), mask)


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Huber loss with threshold beta, mean over channels, averaged over masked tokens."""
    per = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=beta).mean(dim=-1)
    return masked_mean(per, mask)


def with_cls(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) patch mask -> (B, 1+L) with the cls slot counted (dBOT's loss includes cls)."""
    return torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
