"""Corruptions of the robustness node (RC-MAE's robustness table, ImageNet-C-like levels 1..5).

Each corruption maps uint8 images (N, C, H, W) to uint8 images of the same shape (computed in [0, 1],
clipped, rounded back), deterministically (corrupt() seeds the noise from (seed, corruption, severity)). Levels,
from ImageNet-C (Hendrycks & Dietterich 2019, its `corruptions.py`):

- gaussian_noise: x + N(0, sigma^2), sigma = 0.08, 0.12, 0.18, 0.26, 0.38 (of the [0, 1] range).
- gaussian_blur: a Gaussian filter of sigma = 1, 2, 3, 4, 6 pixels at ImageNet-C's 224 px, scaled to the
  image size: sigma * H / 224 (98 px: 0.44, 0.88, 1.31, 1.75, 2.63 px;
  the tiny preset's 8 px: at most 0.21 px, nearly the identity); separable, kernel radius
  round(4 sigma) (skimage's truncate), borders extended (skimage's 'nearest', as ImageNet-C).
- contrast: (x - m) * c + m with m the per-image, per-channel mean, c = 0.4, 0.3, 0.2, 0.1, 0.05.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NOISE_SIGMA = (0.08, 0.12, 0.18, 0.26, 0.38)
BLUR_SIGMA_224 = (1.0, 2.0, 3.0, 4.0, 6.0)
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast")


def gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    sigma = NOISE_SIGMA[severity - 1]
    return x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def blur_sigma(severity: int, size: int) -> float:
    """ImageNet-C's blur sigma of a severity, scaled from 224 px to `size` px."""
    return BLUR_SIGMA_224[severity - 1] * size / 224


def gaussian_blur(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    sigma = blur_sigma(severity, x.shape[-2])
    radius = max(1, int(4 * sigma + 0.5))            # skimage's truncate=4
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = (k / k.sum()).expand(x.shape[1], 1, -1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k[:, :, None, :], groups=x.shape[1])   # rows
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k[:, :, :, None], groups=x.shape[1])


def contrast(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * CONTRAST[severity - 1] + mean


FUNCTIONS = {"gaussian_noise": gaussian_noise, "gaussian_blur": gaussian_blur, "contrast": contrast}


def noise_seed(seed: int, name: str, severity: int) -> int:
    """seed + 10 x the corruption's index + severity: within the 50 seeds after the robustness node's own
    (pipeline.config.node_seed), apart from every other node's."""
    return seed + CORRUPTIONS.index(name) * 10 + severity


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> the corrupted uint8 images; the noise is drawn from a generator seeded by
    noise_seed(seed, corruption, severity), so the same call gives the same images."""
    if name not in FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(FUNCTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5, got {severity}")
    gen = torch.Generator().manual_seed(noise_seed(seed, name, severity))
    out = []
    for chunk in images.split(1024):
        x = FUNCTIONS[name](chunk.float() / 255, severity, gen)
        out.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(out) if out else images.clone()


def plot(clean_top1: float, table: dict[str, dict[str, float]], path, title: str) -> None:
    """robustness.png: top-1 (%) vs severity, one line per corruption, the clean top-1 dashed."""
    from matplotlib.figure import Figure

    from pipeline.plots import save_png

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, by_severity in table.items():
        levels = sorted(by_severity, key=int)
        ax.plot([int(s) for s in levels], [100 * by_severity[s] for s in levels], "o-", label=name)
    ax.axhline(100 * clean_top1, ls="--", color="black", label=f"clean: {100 * clean_top1:.1f}%")
    ax.set_xticks(sorted({int(s) for v in table.values() for s in v}))
    ax.set_xlabel("severity (ImageNet-C levels)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_png(fig, path)
