"""The pictures of masked image modelling: what a pre-trained model makes of a masked image.

- reconstruction_grid(model, images, mean, std, seed, path, n=8): n images (columns) under a seeded mask, drawn
  from the method's own `picture(imgs, generator)` hook (see pipeline/methods). Pixel-target methods (MAE,
  RC-MAE, BootMAE's pixel branch) show original / masked input / reconstruction / reconstruction + visible
  patches, as MAE's visualisation (a norm_pix prediction is un-normalised with the mean and variance of the
  original patch). Feature-target methods (dBOT, SdAE, BootMAE's feature branch) show original / masked input /
  PCA of the target features / PCA of the predicted features on the patch grid: one 3-component PCA fitted on
  the target tokens of the shown images, applied to both, mapped to RGB with one shared min-max, so equal
  colours mean equal features; visible patches are dimmed, tokens without a target (SdAE's visible ones) grey.
  Returns the numbers worth logging: pixel MSE on the hidden patches; cosine and R^2 of pred vs target on the
  hidden tokens.
- attention_grid(encoder, images, mean, std, path, n=4): per image (rows), the input and each head's cls-token
  attention of the last block, upsampled and overlaid on the image.
- pixel_rows(picture, x, mean, std) and pca_colors(target, pred): the arrays behind those figures.

Figures are matplotlib Figures written by pipeline.plots.save_png. Models keep their train/eval modes.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from pipeline.data.datasets import normalize
from pipeline.evaluation.representations import attention_maps
from pipeline.models import losses
from pipeline.plots import save_png

GREY = 0.5          # hidden patches of the masked input, and tokens without a target
DIM = 0.3           # visible tokens of a feature picture keep this share of their colour (the rest is white)


@contextmanager
def _eval_mode(model: nn.Module):
    """model.eval() inside, then every submodule's own previous mode back (teachers stay in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def unnormalize_patches(pred: torch.Tensor, patches: torch.Tensor, channels: int | None = None,
                        eps: float = 1e-6) -> torch.Tensor:
    """Undo losses.normalize_patches (per colour channel, as losses.normalize_patches_per_channel, when
    `channels` is given) on pred (B, L, p*p*C) with the mean and variance of the original patches."""
    b, n, d = pred.shape
    split = (b, n, d // channels, channels) if channels else (b, n, 1, d)
    pred, patches = pred.reshape(split), patches.reshape(split)
    dim = -2 if channels else -1
    mean, var = patches.mean(dim=dim, keepdim=True), patches.var(dim=dim, keepdim=True)
    return (pred * (var + eps) ** 0.5 + mean).reshape(b, n, d)


def _patch_size(mask: torch.Tensor, x: torch.Tensor) -> int:
    return x.shape[-1] // math.isqrt(mask.shape[1])


def _to_unit(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Normalised images (B, C, H, W) -> the [0, 1] scale of the uint8 images (not clamped)."""
    m, s = (torch.tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1) for v in (mean, std))
    return x * s + m


def _hidden_pixels(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 patch mask -> (B, C, H, W) bool, True on the pixels of hidden patches."""
    p, c = _patch_size(mask, x), x.shape[1]
    return losses.unpatchify(mask.float()[..., None].expand(-1, -1, p * p * c), p, c).bool()


def _input_rows(x: torch.Tensor, mask: torch.Tensor, mean: list[float], std: list[float]) -> dict:
    original = _to_unit(x, mean, std)
    return {"original": original,
            "masked input": original.masked_fill(_hidden_pixels(mask, x), GREY)}


def pixel_rows(picture: dict, x: torch.Tensor, mean: list[float], std: list[float]) -> dict[str, torch.Tensor]:
    """A "pixels" picture of normalised images x (B, C, H, W) -> rows {"original", "masked input",
    "reconstruction", "reconstruction + visible"}, each (B, C, H, W) on the [0, 1] scale (not clamped)."""
    mask, pred = picture["mask"].to(x.device), picture["pred"].float().to(x.device)
    p, c = _patch_size(mask, x), x.shape[1]
    if picture["norm_pix"]:
        pred = unnormalize_patches(pred, losses.patchify(x, p), c if picture.get("per_channel") else None)
    rows = _input_rows(x, mask, mean, std)
    recon = _to_unit(losses.unpatchify(pred, p, c), mean, std)
    rows["reconstruction"] = recon
    rows["reconstruction + visible"] = torch.where(_hidden_pixels(mask, x), recon, rows["original"])
    return rows


def _pixel_numbers(picture: dict, x: torch.Tensor, rows: dict) -> dict[str, float]:
    """MSE on the hidden patches: of the shown reconstruction on the [0, 1] scale, and of the prediction in the
    target's own space (what the pixel loss sees, without centre weighting)."""
    mask = picture["mask"].float().to(x.device)
    hidden = _hidden_pixels(mask, x)
    shown = ((rows["reconstruction"] - rows["original"]) ** 2)[hidden].mean()
    p, c = _patch_size(mask, x), x.shape[1]
    target = losses.patchify(x, p)
    if picture["norm_pix"]:
        target = (losses.normalize_patches_per_channel(target, c) if picture.get("per_channel")
                  else losses.normalize_patches(target))
    in_target_space = losses.mse(picture["pred"].to(x.device), target, mask)
    return {"mse_hidden": shown.item(), "target_mse_hidden": in_target_space.item()}


def pca_colors(target: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and predicted features (B, L, D) -> RGB colours (B, L, 3) in [0, 1].

    One 3-component PCA (SVD of the centred target tokens of all images; each component's sign fixed so its
    largest loading is positive) is applied to both, then each component is min-max scaled over the tokens of
    both together: the same feature gets the same colour in either. Tokens with a non-finite feature (no
    target) are NaN and left out of the fit and the scaling.
    """
    t, p = target.detach().double().flatten(0, 1).cpu(), pred.detach().double().flatten(0, 1).cpu()
    fit = t[torch.isfinite(t).all(dim=-1)]
    center = fit.mean(dim=0)
    _, _, vh = torch.linalg.svd(fit - center, full_matrices=False)
    comps = vh[:3]
    comps = comps * torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
    comps = torch.cat([comps, comps.new_zeros(3 - len(comps), comps.shape[1])])   # fewer than 3 directions
    pt, pp = (t - center) @ comps.T, (p - center) @ comps.T
    both = torch.cat([pt, pp])
    both = both[torch.isfinite(both).all(dim=-1)]
    lo, hi = both.amin(dim=0), both.amax(dim=0)
    scale = lambda z: ((z - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1).float().reshape(*target.shape[:2], 3)
    return scale(pt), scale(pp)


def _grid_image(colors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token colours (B, L, 3) -> (B, 3, g, g) images: visible tokens dimmed, tokens without a colour grey."""
    visible = (mask.cpu() < 0.5)[..., None]
    colors = torch.where(visible, DIM * colors + (1 - DIM), colors)
    colors = torch.nan_to_num(colors, nan=GREY)
    g = math.isqrt(colors.shape[1])
    return colors.transpose(1, 2).reshape(colors.shape[0], 3, g, g)


def _feature_rows(features: dict) -> dict[str, torch.Tensor]:
    target, pred = pca_colors(features["target"], features["pred"])
    return {"target features (PCA)": _grid_image(target, features["mask"]),
            "predicted features (PCA)": _grid_image(pred, features["mask"])}


def _feature_numbers(features: dict) -> dict[str, float]:
    """Over the hidden tokens that have a target: the mean cosine similarity of predicted and target features, and
    R^2 = 1 - SSE / (the targets' squared deviation from their mean token): a prediction of the mean token, which
    can reach a high cosine when the tokens share a large common part, has R^2 0."""
    pred, target = features["pred"].double().cpu(), features["target"].double().cpu()
    keep = (features["mask"].cpu() > 0.5) & torch.isfinite(target).all(dim=-1) & torch.isfinite(pred).all(dim=-1)
    pred, target = pred[keep], target[keep]
    r2 = 1 - ((pred - target) ** 2).sum() / ((target - target.mean(dim=0)) ** 2).sum().clamp_min(1e-12)
    return {"cosine_hidden": F.cosine_similarity(pred, target, dim=-1).mean().item(), "r2_hidden": r2.item()}


def _shown(img: torch.Tensor):
    """(C, H, W) in [0, 1] -> an array for imshow (H, W) grey or (H, W, 3)."""
    img = img.detach().float().cpu().clamp(0, 1)
    return (img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy()


def _draw(rows: dict[str, torch.Tensor], title: str, path: Path | str) -> None:
    """One row of images per entry of rows (label -> (B, C, h, w) in [0, 1]), one column per image."""
    n = len(next(iter(rows.values())))
    fig = Figure(figsize=(1.2 * n + 1.4, 1.25 * len(rows) + 0.7))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for ax_row, (label, images) in zip(axes, rows.items()):
        for ax, img in zip(ax_row, images):
            ax.imshow(_shown(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        ax_row[0].set_ylabel(label.replace(" + ", "\n+ ").replace(" (", "\n("), fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_png(fig, path)


SHOWN = {"pixels": "reconstruction of the hidden patches (grey in the masked input)",
         "features": "predicted vs target features as RGB: a 3-component PCA of the target tokens, one colour "
                     "scale for both (visible patches dimmed, tokens without a target grey)"}


def _title(method: str, kinds: list[str], ratio: float, seed: int, numbers: dict) -> str:
    values = ", ".join(f"{k} {v:.4g}" for k, v in numbers.items())
    return "\n".join([f"{method}: {SHOWN[kinds[0]]}", *(f"and {SHOWN[k]}" for k in kinds[1:]),
                      f"{ratio:.0%} of the patches hidden (mask seed {seed}); {values}"])


def reconstruction_grid(model: nn.Module, images: torch.Tensor, mean: list[float], std: list[float], seed: int,
                        path: Path | str, n: int = 8, method: str | None = None) -> dict[str, float]:
    """Draw what `model` (a method with a `picture` hook) makes of the first n uint8 images (N, C, H, W) under a
    mask drawn from torch.Generator seeded with `seed`; write the PNG to path. `method` names it in the title
    (default: the class name). Returns {"mse_hidden", "target_mse_hidden"} for pixel pictures,
    {"cosine_hidden", "r2_hidden"} for feature pictures (both for BootMAE), and "mask_ratio". With norm_pix
    the shown reconstruction borrows each hidden patch's own mean and variance (MAE's visualisation), so
    mse_hidden flatters it; target_mse_hidden is in the space of the loss."""
    x = normalize(images[:n].to(_device(model)), mean, std)
    with _eval_mode(model), torch.no_grad():
        picture = model.picture(x, torch.Generator().manual_seed(seed))
    features = picture if picture["kind"] == "features" else picture.get("features")
    rows, numbers = _input_rows(x, picture["mask"].to(x.device), mean, std), {}
    if picture["kind"] == "pixels":
        rows = pixel_rows(picture, x, mean, std)
        numbers.update(_pixel_numbers(picture, x, rows))
    if features is not None:
        rows.update(_feature_rows(features))
        numbers.update(_feature_numbers(features))
    ratio = picture["mask"].float().mean().item()
    kinds = ["pixels"] * (picture["kind"] == "pixels") + ["features"] * (features is not None)
    title = _title(method or type(model).__name__, kinds, ratio, seed, numbers)
    _draw(rows, title, path)
    return dict(numbers, mask_ratio=ratio)


def attention_grid(encoder: nn.Module, images: torch.Tensor, mean: list[float], std: list[float],
                   path: Path | str, n: int = 4) -> None:
    """Rows: the first n uint8 images (N, C, H, W); columns: the input, then each head's cls-token attention over
    the patches in the encoder's last block (full image), upsampled and overlaid on the image, each map min-max
    scaled on its own (the title gives the range of the raw probabilities)."""
    x = normalize(images[:n].to(_device(encoder)), mean, std)
    with _eval_mode(encoder):
        cls = attention_maps(encoder, x)[-1][:, :, 0, 1:].float().cpu().clone()   # (B, heads, L)
    b, heads, num = cls.shape
    g = math.isqrt(num)
    maps = F.interpolate(cls.reshape(b, heads, g, g), size=x.shape[-2:], mode="bilinear", align_corners=False)
    lo, hi = maps.amin(dim=(-2, -1), keepdim=True), maps.amax(dim=(-2, -1), keepdim=True)
    maps = (maps - lo) / (hi - lo).clamp_min(1e-12)
    shown = (images[:n].float() / 255 if images.dtype == torch.uint8 else images[:n].float()).cpu()
    fig = Figure(figsize=(1.6 * (1 + heads) + 0.4, 1.6 * b + 0.6))
    axes = fig.subplots(b, 1 + heads, squeeze=False)
    for i, ax_row in enumerate(axes):
        for j, ax in enumerate(ax_row):
            ax.imshow(_shown(shown[i]), cmap="gray", vmin=0, vmax=1)
            if j:
                ax.imshow(maps[i, j - 1].numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            ax.set_axis_off()
            if i == 0:
                ax.set_title("input" if j == 0 else f"head {j - 1}", fontsize=9)
    fig.suptitle(f"Last block: cls-token attention per head over the {num} patches (bilinear upsampling, each map "
                 f"min-max scaled;\nraw probabilities {cls.min().item():.3g} to {cls.max().item():.3g}, uniform "
                 f"{1 / num:.3g})", fontsize=9)
    save_png(fig, path)
