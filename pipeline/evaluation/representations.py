"""Representation analyses of trained encoders, as in the dBOT repository's analysis/analysis.py.

They show how the encoders of the dBOT chain differ beyond accuracy:
- attention_maps / mean_attention_distance: per layer and head, how far (in pixels) patches attend; the
  dBOT paper finds distillation makes heads more local-and-global diverse across layers.
- singular_value_share: per layer, the share of the top-k singular values of the normalised patch-token
  matrix; a low share means the tokens spread over many directions (no dimensional collapse).
- linear_cka / cka_per_layer: linear CKA (Kornblith et al. 2019) between the same layer of two encoders,
  e.g. consecutive dBOT stages, to see where the representations converge.
- plot_*: the figures of those tables (matplotlib Figure + pipeline.plots.save_png).

Every analysis takes normalised images (B, C, H, W) float, runs the encoder in eval mode under
torch.inference_mode() on the full image, and is vectorised over tokens and heads.
timm's Attention uses fused attention and returns no weights, so the probabilities are recomputed from
each block's input with the block's own modules while the blocks run one by one.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn

from pipeline.models.encoder import Encoder
from pipeline.plots import save_png


def _attention_probs(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention (B, heads, N, N) of a timm ViT block on its input x (B, N, D)."""
    attn = block.attn
    qkv = attn.qkv(block.norm1(x)).reshape(*x.shape[:2], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _block_attention(encoder: Encoder, images: torch.Tensor) -> Iterator[torch.Tensor]:
    """Each block's attention probabilities in turn, running the blocks one by one."""
    x = encoder.embed(images)
    for block in encoder.vit.blocks:
        yield _attention_probs(block, x)
        x = block(x)


def _block_outputs(encoder: Encoder, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output (B, 1+L, D), before the final norm."""
    _, blocks = encoder(images, return_blocks=tuple(range(len(encoder.vit.blocks))))
    return [blocks[i] for i in range(len(blocks))]


@torch.inference_mode()
def attention_maps(encoder: Encoder, images: torch.Tensor) -> list[torch.Tensor]:
    """Per block, the attention probabilities (B, heads, 1+L, 1+L) of the full-image forward pass."""
    encoder.eval()
    return list(_block_attention(encoder, images))


def patch_distances(grid: int, patch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(L, L) Euclidean distances in pixels between the patches of a grid x grid layout (row-major)."""
    rows, cols = torch.meshgrid(torch.arange(grid, device=device), torch.arange(grid, device=device),
                                indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=1).double()
    return torch.cdist(coords, coords) * patch_size


def attention_distance_from_maps(maps: torch.Tensor, grid: int, patch_size: int) -> torch.Tensor:
    """Mean attention distance (heads,) in pixels of one layer's attention maps (B, heads, 1+L, 1+L).

    The cls token is dropped as query and key; each patch query's attention is renormalised over the
    patch keys, weighted by the key distances, then averaged over patch queries and images.
    """
    patches = maps[..., 1:, 1:].double()
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(patches.dtype).tiny)
    distance = (patches * patch_distances(grid, patch_size, maps.device)).sum(dim=-1)   # (B, heads, L)
    return distance.mean(dim=(0, 2)).float()


@torch.inference_mode()
def mean_attention_distance(encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """(depth, heads) attention-weighted mean distance in pixels between patch queries and patch keys."""
    encoder.eval()
    patch_size = encoder.config["patch_size"]
    return torch.stack([attention_distance_from_maps(maps, encoder.grid, patch_size)
                        for maps in _block_attention(encoder, images)])


def top_k_share(tokens: torch.Tensor, top_k: int) -> torch.Tensor:
    """(B,) share of the top_k singular values in the sum of singular values of each (N, D) token matrix."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    s = torch.linalg.svdvals(tokens.double())                                         # (B, min(N, D)), descending
    return (s[:, :top_k].sum(dim=-1) / s.sum(dim=-1)).float()


@torch.inference_mode()
def singular_value_share(encoder: Encoder, images: torch.Tensor, top_k: int = 5) -> torch.Tensor:
    """(depth,) top-k singular value share of the layer-normalised patch-token matrix, averaged over images."""
    encoder.eval()
    shares = []
    for h in _block_outputs(encoder, images):
        tokens = F.layer_norm(h[:, 1:], h.shape[-1:])
        shares.append(top_k_share(tokens, top_k).mean())
    return torch.stack(shares)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of features x (n, d1) and y (n, d2): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples in both: {x.shape[0]} != {y.shape[0]} rows")
    x, y = x.double(), y.double()
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return (cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y))).item()


@torch.inference_mode()
def layer_features(encoder: Encoder, images: torch.Tensor) -> list[torch.Tensor]:
    """Per block, the (B*L, D) patch-token features before the final norm."""
    encoder.eval()
    return [h[:, 1:].reshape(-1, h.shape[-1]) for h in _block_outputs(encoder, images)]


def cka_per_layer(enc_a: Encoder, enc_b: Encoder, images: torch.Tensor) -> torch.Tensor:
    """(depth,) linear CKA between the patch-token features of the same block of two encoders."""
    if len(enc_a.vit.blocks) != len(enc_b.vit.blocks):
        depths = f"{len(enc_a.vit.blocks)} and {len(enc_b.vit.blocks)}"
        raise ValueError(f"CKA per layer needs encoders of equal depth, got {depths}")
    pairs = zip(layer_features(enc_a, images), layer_features(enc_b, images))
    return torch.tensor([linear_cka(a, b) for a, b in pairs])


def _layer_axis(ax) -> None:
    """Label the x axis as the (1-based, integer) layer index."""
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_attention_distance(table: dict[str, torch.Tensor], path: Path | str) -> None:
    """One panel per encoder: each head's mean attention distance as a dot per layer, the head mean as a line."""
    fig = Figure(figsize=(3.5 * len(table), 3.5))
    axes = fig.subplots(1, len(table), sharey=True, squeeze=False)[0]
    for ax, (weights, distance) in zip(axes, table.items()):
        distance = distance.detach().cpu()
        layers = torch.arange(1, distance.shape[0] + 1)
        ax.scatter(layers.repeat_interleave(distance.shape[1]), distance.flatten(), s=10, alpha=0.6,
                   label="head")
        ax.plot(layers, distance.mean(dim=1), color="black", marker="o", ms=3, label="mean over heads")
        _layer_axis(ax)
        ax.set_title(weights)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean attention distance (pixels)")
    axes[0].legend(fontsize="small")
    save_png(fig, path)


def plot_singular_value_share(table: dict[str, torch.Tensor], path: Path | str) -> None:
    """Top-k singular value share vs layer, one line per encoder."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for weights, share in table.items():
        share = share.detach().cpu()
        ax.plot(torch.arange(1, len(share) + 1), share, marker="o", ms=3, label=weights)
    _layer_axis(ax)
    ax.set_ylabel("top-k singular value share")
    ax.set_title("Normalised patch tokens: a low share = tokens spread over many directions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_png(fig, path)


def _cka_lines(ax, lines: dict, title: str) -> None:
    for pair, cka in lines.items():
        cka = cka.detach().cpu()
        label = " vs ".join(pair) if isinstance(pair, tuple) else pair
        ax.plot(torch.arange(1, len(cka) + 1), cka, marker="o", ms=3, label=label)
    _layer_axis(ax)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_cka(matrix: torch.Tensor | dict[str | tuple[str, str], torch.Tensor], path: Path | str,
             stage_means: dict[str, torch.Tensor] | None = None) -> None:
    """Linear CKA vs layer: one (depth,) tensor, or one line per pair of encoders (key "a vs b" or (a, b)).

    stage_means (the teacher-swap study): per stage, the mean CKA over the pairs of students of different
    chains, drawn in a first panel: do students from different teachers grow alike stage by stage?
    """
    lines = matrix if isinstance(matrix, dict) else {"CKA": matrix}
    fig = Figure(figsize=(12 if stage_means else 6, 4))
    axes = fig.subplots(1, 2 if stage_means else 1, squeeze=False)[0]
    if stage_means:
        _cka_lines(axes[0], {f"stage {k}": v for k, v in stage_means.items()},
                   "Teacher-swap study: mean CKA between chains")
    _cka_lines(axes[-1], lines, "Layer-wise similarity of patch-token features")
    axes[0].set_ylabel("linear CKA")
    save_png(fig, path)

