"""Dense probe: semantic segmentation with a linear head on frozen patch tokens, scored by mean IoU.

Datasets (params segprobe.dataset), each a SegDataset of uint8 images (N, C, S, S) at data.img_size and uint8
masks (N, S, S) of class ids (255 = ignore):

- digit_canvas: made from the study's own prepared images, deterministically. Each canvas is S x S and holds
  a 2x2 grid of half-size digits (each image resized, bicubic with antialias, to its quadrant: S//2 or
  S - S//2 pixels a side; quadrants in row-major order). The digits are drawn without replacement (a fresh
  permutation whenever one runs out) by numpy's default_rng([data.split_seed, 0]) for the train canvases
  (from train images) and [data.split_seed, 1] for the val canvases (from val images); a split of N images
  makes max(N // 4, MIN_CANVASES) canvases. Mask: 0 = background, 1 + digit class where the pixel's grey value
  (luma for RGB) is above FOREGROUND_THRESHOLD (64 of 255). A 3-channel dataset without a dark background
  (median train grey above the threshold, e.g. CIFAR) has no background to threshold: each quadrant is then
  labelled whole with 1 + its image's class (class 0 never occurs).
- folder: <segprobe.path>/images/*.png|jpg|jpeg and <segprobe.path>/masks/<same stem>.png, a single-channel
  mask of class ids (255 = ignore) of the image's size. Image (bicubic) and mask (nearest) get the study's
  geometry (shorter side to data.img_size, centre crop, as data's imagefolder reader) and data.channels; pairs
  are split into train/val by data.val_fraction with data.split_seed; classes = segprobe.num_classes, or
  1 + the largest mask value.

Probe (MAE's linear-probe recipe, per token): the encoder is frozen and in eval mode; its patch tokens after
the final norm (B, L, D) are computed once (in segprobe.precision). Head: BatchNorm without affine + Linear
(D, classes) on every token (a 1x1 conv on the patch grid) -> logits on the grid -> bilinear upsampling to the
pixels (align_corners=False; done as two interpolation matrices, so the backward pass is deterministic on a GPU
too) -> per-pixel cross-entropy, ignore 255. AdamW with cosine lr per step, seeded shuffles and init. For speed the
training loss scores a lattice of the upsampled pixels, every loss_stride-th row and column (at least
LOSS_PIXELS_PER_PATCH per patch: 98-px images on a 7x7 grid -> stride 3, a ninth of the pixels; 1 when the
images are small), its offset moving by one position per epoch; validation scores every pixel.
Metrics on val: mean IoU over the classes that occur in the ground truth or the prediction (background
included), pixel accuracy and per-class IoU (None for a class that occurs in neither).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.datasets import LUMA, Prepared
from pipeline.data.folders import convert_pil_mode
from pipeline.errors import PipelineError
from pipeline.evaluation.probes import extract_features

IGNORE = 255
FOREGROUND_THRESHOLD = 64          # grey value (0..255) above which a canvas pixel belongs to its digit
MIN_CANVASES = 8                   # per split, whatever the number of images
LOSS_PIXELS_PER_PATCH = 4          # the training loss scores at least this many pixel rows (and columns) per patch
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class SegDataset:
    """Images uint8 (N, C, S, S), masks uint8 (N, S, S) of class ids (IGNORE = not scored), class names and a
    record of how the set was made (metrics.json "dataset")."""
    train_x: torch.Tensor
    train_m: torch.Tensor
    val_x: torch.Tensor
    val_m: torch.Tensor
    class_names: list[str]
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ---- digit canvases ------------------------------------------------------------------------------------

def canvas_index(num_images: int, num_canvases: int, rng: np.random.Generator) -> np.ndarray:
    """(num_canvases, 4) image indices: consecutive draws of seeded permutations of range(num_images)."""
    need = 4 * num_canvases
    perms = [rng.permutation(num_images) for _ in range(math.ceil(need / num_images))]
    return np.concatenate(perms)[:need].reshape(num_canvases, 4)


def grey(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1|3, H, W) -> float (N, H, W) grey values 0..255 (luma for RGB)."""
    x = x.float()
    return x[:, 0] if x.shape[1] == 1 else (x * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1)


def make_canvases(images: torch.Tensor, labels: torch.Tensor, index: np.ndarray, whole_quadrant: bool = False,
                  threshold: int = FOREGROUND_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N, C, S, S), labels (N,), index (n, 4) -> canvases uint8 (n, C, S, S), masks uint8 (n, S, S).

    Canvas i holds images index[i] resized to the quadrants (top-left, top-right, bottom-left, bottom-right);
    mask = 1 + label where the resized digit's grey value > threshold (the whole quadrant if whole_quadrant),
    else 0."""
    n, (c, s) = len(index), images.shape[1:3]
    idx = torch.as_tensor(index, dtype=torch.long)
    x = torch.zeros((n, c, s, s), dtype=torch.uint8)
    m = torch.zeros((n, s, s), dtype=torch.uint8)
    cuts = (0, s // 2, s)
    for q in range(4):
        r0, r1 = cuts[q // 2], cuts[q // 2 + 1]
        c0, c1 = cuts[q % 2], cuts[q % 2 + 1]
        digits = images[idx[:, q]]
        if digits.shape[-2:] != (r1 - r0, c1 - c0):
            digits = F.interpolate(digits.float(), size=(r1 - r0, c1 - c0), mode="bicubic", antialias=True,
                                   align_corners=False).round().clamp(0, 255).to(torch.uint8)
        x[:, :, r0:r1, c0:c1] = digits
        fg = torch.ones_like(digits[:, 0], dtype=torch.bool) if whole_quadrant else grey(digits) > threshold
        m[:, r0:r1, c0:c1] = fg.to(torch.uint8) * (1 + labels[idx[:, q]]).to(torch.uint8).view(-1, 1, 1)
    return x, m


def digit_canvas(prep: Prepared, split_seed: int, threshold: int = FOREGROUND_THRESHOLD) -> SegDataset:
    """The digit-canvas set of a prepared dataset (see the module doc); same inputs, same bytes."""
    if len(prep.class_names) + 1 > IGNORE:
        raise PipelineError(f"digit_canvas needs fewer than {IGNORE} classes, the dataset has {len(prep.class_names)}")
    whole = prep.train_x.shape[1] == 3 and float(grey(prep.train_x[:1024]).median()) > threshold
    out, counts = {}, {}
    for i, split in enumerate(("train", "val")):
        x, y = getattr(prep, f"{split}_x"), getattr(prep, f"{split}_y")
        rng = np.random.default_rng([split_seed, i])
        index = canvas_index(len(x), max(len(x) // 4, MIN_CANVASES), rng)
        out[split] = make_canvases(x, y, index, whole, threshold)
        counts[split] = {"canvases": len(index), "from_images": len(x)}
    s = prep.train_x.shape[-1]
    names = ["background"] + list(prep.class_names)
    info = {"name": "digit_canvas", "source": prep.source, "split_seed": split_seed, "canvas_size": s,
            "digit_sizes": sorted({s // 2, s - s // 2}), "digits_per_canvas": 4, "splits": counts,
            "draws": "numpy default_rng([split_seed, 0 train | 1 val]), consecutive permutations of the split",
            "resize": "bicubic, antialias", "min_canvases": MIN_CANVASES,
            "labelling": ("whole quadrant = 1 + class (no dark background)" if whole
                          else f"1 + class where grey > {threshold}, else 0 = background"),
            "threshold": None if whole else threshold, "num_classes": len(names), "class_names": names}
    return SegDataset(*out["train"], *out["val"], names, info)


# ---- image/mask folders --------------------------------------------------------------------------------

def folder_pairs(path) -> list[tuple[Path, Path]]:
    """Sorted (image, mask) pairs of <path>/images and <path>/masks; a missing folder, no images, an image
    without a mask or two images of one stem is a PipelineError."""
    if not path:
        raise PipelineError("segprobe.path is required for segprobe.dataset folder")
    root = Path(path)
    for sub in (root, root / "images", root / "masks"):
        if not sub.is_dir():
            raise PipelineError(f"missing segmentation folder: {sub}")
    images = sorted(p for p in (root / "images").iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PipelineError(f"{root / 'images'} holds no .png/.jpg images")
    stems = [p.stem for p in images]
    if len(set(stems)) < len(stems):
        raise PipelineError(f"{root / 'images'}: two images share the stem "
                            f"{next(s for s in stems if stems.count(s) > 1)!r}")
    pairs = [(p, root / "masks" / f"{p.stem}.png") for p in images]
    missing = [m for _, m in pairs if not m.is_file()]
    if missing:
        raise PipelineError(f"no mask {missing[0]} for image {root / 'images' / missing[0].stem}.*"
                            + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if len(pairs) < 2:
        raise PipelineError(f"{root}: need at least 2 image/mask pairs (one train, one val), found {len(pairs)}")
    return pairs


def _fit(im, size: int, resample):
    """Pillow image -> shorter side resized to size, centre crop size x size (as data's imagefolder reader)."""
    w, h = im.size
    nw, nh = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def _read_pair(image: Path, mask: Path, mode: str, size: int, num_classes: int | None):
    """-> (uint8 (C, size, size) image, int array of the mask's raw values (h, w), the mask resized uint8)."""
    from PIL import Image, ImageOps
    try:
        with Image.open(image) as im:
            im = convert_pil_mode(ImageOps.exif_transpose(im), mode)
        with Image.open(mask) as mk:
            mk.load()
    except Exception as e:   # Pillow raises many types for corrupt or foreign files
        raise PipelineError(f"cannot read {image} or its mask: {e}") from None
    if mk.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise PipelineError(f"{mask}: a mask must be single-channel class ids, got mode {mk.mode}")
    if mk.size != im.size:
        raise PipelineError(f"{mask} is {mk.size[0]}x{mk.size[1]} but its image {image} is {im.size[0]}x{im.size[1]}")
    values = np.asarray(mk).astype(np.int64)
    top = num_classes if num_classes is not None else IGNORE
    bad = (values != IGNORE) & ((values < 0) | (values >= top))
    if bad.any():
        raise PipelineError(f"{mask}: value {int(values[bad][0])} is outside the classes [0, {top}) and not "
                            f"{IGNORE} (ignore)")
    x = np.asarray(_fit(im, size, Image.Resampling.BICUBIC), dtype=np.uint8)
    m = np.asarray(_fit(Image.fromarray(values.astype(np.uint8)), size, Image.Resampling.NEAREST))
    return torch.from_numpy((x[None] if x.ndim == 2 else x.transpose(2, 0, 1)).copy()), torch.from_numpy(m.copy())


def folder_dataset(path, num_classes: int | None, img_size: int, channels: int, split_seed: int,
                   val_fraction: float) -> SegDataset:
    """The folder set at `path` (segprobe.path; num_classes None: read from the masks) as images of `img_size` pixels
    and `channels` channels, split by `split_seed` with a `val_fraction` held out (params data; see the module doc)."""
    pairs = folder_pairs(path)
    k = num_classes
    if k is not None and k > IGNORE:
        raise PipelineError(f"segprobe.num_classes must be at most {IGNORE} (255 is ignore), got {k}")
    mode, size = ("L" if channels == 1 else "RGB"), img_size
    read = [_read_pair(i, m, mode, size, k) for i, m in pairs]
    if k is None:
        found = [int(m[m != IGNORE].max()) for _, m in read if (m != IGNORE).any()]
        k = 1 + max(found, default=0)
        if k < 2:
            raise PipelineError(f"{path}: the masks hold fewer than 2 classes; set segprobe.num_classes")
    n = len(pairs)
    order = np.random.default_rng(split_seed).permutation(n)
    n_val = min(n - 1, max(1, int(n * val_fraction + 0.5)))
    splits = {"val": sorted(order[:n_val]), "train": sorted(order[n_val:])}
    stack = {s: (torch.stack([read[i][0] for i in ids]), torch.stack([read[i][1] for i in ids]))
             for s, ids in splits.items()}
    names = [str(c) for c in range(k)]
    info = {"name": "folder", "path": str(path), "pairs": n, "img_size": size,
            "split_seed": split_seed, "val_fraction": val_fraction,
            "splits": {s: {"images": len(ids)} for s, ids in splits.items()},
            "num_classes": k, "class_names": names, "ignore": IGNORE}
    return SegDataset(*stack["train"], *stack["val"], names, info)


# ---- the probe -----------------------------------------------------------------------------------------

class _PatchTokens(nn.Module):
    """An encoder whose `features` are its patch tokens (B, L, D) after the final norm."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def features(self, x: torch.Tensor, kind: str = "patches") -> torch.Tensor:
        return self.encoder(x)[:, 1:]


def patch_tokens(encoder: nn.Module, images: torch.Tensor, mean, std, precision: str = "fp32",
                 desc: str = "patch tokens") -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32 (N, L, D) patch tokens of the frozen encoder (eval, inference mode),
    computed in `precision`."""
    return extract_features(_PatchTokens(encoder), images, mean, std, "patches", precision, batch_size=256, desc=desc)


def interpolation_matrix(src: int, dst: int) -> torch.Tensor:
    """(dst, src) matrix U with U @ v = 1-D linear interpolation of v to dst samples (align_corners=False):
    bilinear upsampling of X (src x src) is U_h X U_w^T."""
    eye = torch.eye(src, dtype=torch.float64)[:, None]                      # (src, 1, src)
    return F.interpolate(eye, size=dst, mode="linear", align_corners=False)[:, 0].T.float()


class SegHead(nn.Module):
    """BatchNorm (no affine) + Linear(D, classes) per patch token, bilinearly upsampled to size x size pixels."""

    def __init__(self, dim: int, num_classes: int, grid: int, size: int):
        super().__init__()
        self.grid = grid
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("up_h", interpolation_matrix(grid, size), persistent=False)
        self.register_buffer("up_w", interpolation_matrix(grid, size), persistent=False)

    def grid_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, classes, grid, grid)."""
        b, n, d = tokens.shape
        if n != self.grid * self.grid:
            raise PipelineError(f"{n} patch tokens do not make a {self.grid}x{self.grid} grid")
        logits = self.linear(self.norm(tokens.reshape(b * n, d)))
        return logits.view(b, self.grid, self.grid, -1).permute(0, 3, 1, 2)

    def forward(self, tokens: torch.Tensor, rows: torch.Tensor | None = None,
                cols: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) -> pixel logits (B, classes, size, size), or only at pixel rows x cols (index tensors)."""
        up_h = self.up_h if rows is None else self.up_h[rows]
        up_w = self.up_w if cols is None else self.up_w[cols]
        return torch.einsum("bkij,hi,wj->bkhw", self.grid_logits(tokens), up_h, up_w)


def confusion(pred: torch.Tensor, gt: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(classes, classes) int64 counts [gt, pred] over the pixels whose gt is not IGNORE."""
    gt, pred = gt.reshape(-1).long(), pred.reshape(-1).long()
    keep = gt != IGNORE
    return torch.bincount(gt[keep] * num_classes + pred[keep], minlength=num_classes ** 2).view(
        num_classes, num_classes).cpu()


def iou_scores(conf: torch.Tensor) -> tuple[dict, list]:
    """Confusion [gt, pred] -> ({"miou", "pixel_acc"}, per-class IoU list with None for classes that occur
    in neither gt nor prediction); mIoU averages the others."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    ious = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
    seen = [v for v in ious if v is not None]
    total = float(conf.sum())
    return {"miou": sum(seen) / len(seen) if seen else 0.0,
            "pixel_acc": float(tp.sum()) / total if total else 0.0}, ious


@torch.no_grad()
def predict(head: SegHead, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Per-pixel class predictions uint8 (N, size, size) of an eval-mode head, on CPU."""
    head.eval()
    device = head.up_h.device
    return torch.cat([head(tokens[i:i + batch_size].to(device)).max(1).indices.to(torch.uint8).cpu()
                      for i in range(0, len(tokens), batch_size)])


def evaluate_head(head: SegHead, tokens: torch.Tensor, masks: torch.Tensor, num_classes: int,
                  batch_size: int = 64) -> tuple[dict, list]:
    conf = confusion(predict(head, tokens, batch_size), masks, num_classes)
    return iou_scores(conf)


def loss_stride(size: int, grid: int) -> int:
    """Stride of the pixel lattice the training loss scores: at least 4 x 4 pixels per patch (1 = every pixel)."""
    return max(1, size // (LOSS_PIXELS_PER_PATCH * grid))


def train_probe(train_t: torch.Tensor, train_m: torch.Tensor, val_t: torch.Tensor, val_m: torch.Tensor,
                num_classes: int, grid: int, epochs: int, batch_size: int, lr: float, weight_decay: float,
                seed: int, device: str | torch.device = "cpu",
                stride: int | None = None) -> tuple[dict, list, list[dict], SegHead]:
    """Train the head on frozen tokens (N, L, D) against masks uint8 (N, S, S).

    The loss scores the upsampled logits on the pixel lattice offset + stride * k (stride: loss_stride
    unless given; 1 = every pixel); the offset steps through the stride x stride positions, one per epoch,
    so a run of stride**2 epochs scores every pixel once. Validation always scores every pixel.
    Returns (final {"miou", "pixel_acc"} on val, per-class IoU list, per-epoch history
    [{"epoch", "train_loss", "val_miou"}], the trained head in eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = SegHead(train_t.shape[-1], num_classes, grid, train_m.shape[-1]).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(train_t) / batch_size))
    tokens, masks = train_t.to(device), train_m.to(device)
    size = train_m.shape[-1]
    stride = loss_stride(size, grid) if stride is None else stride
    history = []
    for epoch in range(epochs):
        head.train()
        rows = torch.arange(epoch % stride, size, stride, device=device)
        cols = torch.arange(epoch // stride % stride, size, stride, device=device)
        order, total, pixels = torch.randperm(len(tokens), generator=gen).to(device), 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            target = masks[idx][:, rows][:, :, cols].long()
            valid = int((target != IGNORE).sum())
            logits = head(tokens[idx], rows, cols)
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum") / max(valid, 1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total, pixels = total + loss.item() * valid, pixels + valid
        metrics, ious = evaluate_head(head, val_t, val_m, num_classes, batch_size)
        history.append({"epoch": epoch, "train_loss": total / max(pixels, 1), "val_miou": metrics["miou"]})
    return metrics, ious, history, head


# ---- the figure ----------------------------------------------------------------------------------------

def class_colours(num_classes: int) -> list:
    """A fixed colour per class id: background (0) black, then tab10/tab20, then evenly spaced hues; then
    white for IGNORE (drawn as index num_classes)."""
    from matplotlib import colormaps
    table = list(colormaps["tab10"].colors) + list(colormaps["tab20"].colors[1::2])
    extra = max(0, num_classes - 1 - len(table))
    hues = [colormaps["hsv"](i / max(extra, 1))[:3] for i in range(extra)]
    return [(0.0, 0.0, 0.0)] + (table + hues)[:num_classes - 1] + [(1.0, 1.0, 1.0)]


def examples_figure(images: torch.Tensor, gt: torch.Tensor, pred: torch.Tensor, class_names: list[str],
                    title: str = ""):
    """A matplotlib Figure: one row per canvas (image, ground truth, prediction), fixed class colours."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    k = len(class_names)
    colours = class_colours(k)
    cmap = ListedColormap(colours)
    fig = Figure(figsize=(7.5, 2.3 * len(images) + 0.8), layout="constrained")
    axes = fig.subplots(len(images), 3, squeeze=False)
    for row, (x, g, p) in enumerate(zip(images, gt, pred)):
        img = x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
        axes[row][0].imshow(img, cmap="gray" if x.shape[0] == 1 else None, vmin=0, vmax=255)
        for col, m in ((1, g), (2, p)):
            m = m.long().clone()
            m[m == IGNORE] = k
            axes[row][col].imshow(m.numpy(), cmap=cmap, vmin=-0.5, vmax=k + 0.5, interpolation="nearest")
        for col, name in enumerate(("image", "ground truth", "prediction")):
            axes[row][col].set_xticks([])
            axes[row][col].set_yticks([])
            if row == 0:
                axes[row][col].set_title(name)
    fig.legend(handles=[Patch(color=c, label=n) for c, n in zip(colours, class_names)], loc="outside lower center",
               ncol=min(k, 6), fontsize="small")
    if title:
        fig.suptitle(title)
    return fig
