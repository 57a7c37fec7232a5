"""Image folders, read as torchvision's ImageFolder reads them: class folders (optionally under train/ and val/),
only image files (the others counted per extension), each image converted to L or RGB, its shorter side resized
(bicubic) and centre-cropped. Both data formats list a folder here (split_folder); the tensor format
(pipeline.data.datasets) reads it into a tensor mapped from an unnamed temporary file (read_images), the streamed
one (pipeline.data.stream) decodes per step.
"""
from __future__ import annotations

import math
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline import layout
from pipeline.errors import PipelineError


def data_folder(data: dict) -> Path:
    """The folder data.path names (an image folder or a CIFAR folder; pipeline.data.stream lists it too); a missing
    path or folder is a PipelineError."""
    if not data.get("path"):
        raise PipelineError(f"data.path is required for dataset {data['dataset']}")
    root = Path(data["path"])
    if not root.is_dir():
        raise PipelineError(f"missing data folder: {root}")
    return root


def split_folder(root: Path, val_fraction: float, seed: int, skipped: dict | None = None) -> tuple[dict, dict]:
    """An image folder's ({class: train image files}, {class: val image files}): its train/ and val/ class folders,
    or its class folders split per class (_split_files). Both formats read what this gives (the tensor path here,
    the streamed one in pipeline.data.stream). Only image files count (layout.is_image_name, as torchvision's
    ImageFolder); the others are left out and counted by extension into `skipped` (see image_files)."""
    skipped = {} if skipped is None else skipped
    if (root / "train").is_dir() or (root / "val").is_dir():
        if not ((root / "train").is_dir() and (root / "val").is_dir()):
            raise PipelineError(f"{root} has only one of train/ and val/; give both or neither")
        train, val = image_files(root / "train", skipped), image_files(root / "val", skipped)
        if list(train) != list(val):
            diff = sorted(set(train) ^ set(val))
            raise PipelineError(f"{root}: train/ and val/ have different class folders (e.g. {', '.join(diff[:5])})")
        return train, val
    return _split_files(image_files(root, skipped), val_fraction, seed)


def image_files(folder: Path, skipped: dict) -> dict[str, list[Path]]:
    """Sorted class folder name -> its sorted image files (layout.is_image_name: an image extension, as torchvision's
    ImageFolder, plus .gif and .pbm). Other files (notes.txt, README) are skipped, counted per extension into
    `skipped` ({".txt": 1, "no extension": 1}); hidden files (.DS_Store, ._x.jpg) are ignored. No class folder, or
    one without image files, is an error; a corrupt file with an image extension is one when it is read."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise PipelineError(f"{folder} holds no class folders")
    out = {}
    for c in classes:
        files = sorted(f for f in c.iterdir() if f.is_file() and not f.name.startswith("."))
        out[c.name] = [f for f in files if layout.is_image_name(f.name)]
        for f in files:
            if not layout.is_image_name(f.name):
                kind = f.suffix.lower() or "no extension"
                skipped[kind] = skipped.get(kind, 0) + 1
        if not out[c.name]:
            others = f" ({len(files)} non-image files)" if files else ""
            raise PipelineError(f"empty class folder: {c}{others}")
    return out


def skipped_note(skipped: dict) -> str:
    """prepare_data's words for the skipped files: "3 non-image files skipped (.txt 2, no extension 1)"."""
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(skipped.items(), key=lambda kn: (-kn[1], kn[0])))
    return f"{sum(skipped.values())} non-image files skipped" + (f" ({kinds})" if kinds else "")


def _split_files(classes: dict, val_fraction: float, seed: int) -> tuple[dict, dict]:
    """Per class, a seeded random round(n * val_fraction) files to val (at least one file stays in train)."""
    rng, train, val = np.random.default_rng(seed), {}, {}
    for name, files in classes.items():
        order = rng.permutation(len(files))
        n_val = min(len(files) - 1, int(len(files) * val_fraction + 0.5))
        val[name] = [files[i] for i in sorted(order[:n_val])]
        train[name] = [files[i] for i in sorted(order[n_val:])]
    return train, val


def read_images(classes: dict, data: dict, scratch: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """{class: files} -> uint8 (N, channels, size, size), mapped from a temporary file in scratch (see
    mapped_empty) and filled one image at a time; int64 labels (N,) = index of the class."""
    size, channels = data["img_size"], data["channels"]
    n = sum(len(f) for f in classes.values())
    x, y = mapped_empty((n, channels, size, size), scratch), torch.empty(n, dtype=torch.int64)
    i = 0
    for label, files in enumerate(classes.values()):
        for f in files:
            x[i], y[i] = _read_image(f, "L" if channels == 1 else "RGB", size), label
            i += 1
    return x, y


def mapped_empty(shape: tuple[int, ...], scratch: Path | None) -> torch.Tensor:
    """An uninitialised uint8 tensor mapped (shared) from an unnamed temporary file in scratch (None: the system's
    temp folder): its pages are the file's, in the page cache, not the process's own memory. The file's space is
    reserved up front (a full disk is a PipelineError here, not a SIGBUS on a write to the mapping); it is freed
    when the last view of the tensor is, or when the process ends."""
    nbytes = math.prod(shape)
    if nbytes == 0:
        return torch.empty(shape, dtype=torch.uint8)
    try:
        if scratch is not None:
            Path(scratch).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=scratch) as f:      # Linux: O_TMPFILE, never linked into the folder
            os.posix_fallocate(f.fileno(), 0, nbytes)
            buf = mmap.mmap(f.fileno(), nbytes)             # holds its own descriptor: f may close
    except OSError as e:
        raise PipelineError(f"cannot make a {nbytes / 2 ** 20:.0f} MB temporary image file in "
                            f"{scratch or tempfile.gettempdir()}: {e}") from None
    return torch.frombuffer(buf, dtype=torch.uint8).view(shape)    # the tensor keeps buf (and the file) alive


def _read_image(path: Path, mode: str, size: int) -> torch.Tensor:
    """Any Pillow image -> uint8 (C, size, size): mode L/RGB, shorter side resized (bicubic), centre crop."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as im:
            im = convert_pil_mode(ImageOps.exif_transpose(im), mode)
    except Exception as e:   # Pillow raises many types for corrupt or foreign files
        raise PipelineError(f"cannot read image {path}: {e}") from None
    return pil_to_tensor(_center_crop(im, size, size))


def pil_to_tensor(im) -> torch.Tensor:
    """A Pillow L or RGB image -> uint8 (C, H, W)."""
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy((arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)).copy())


def _center_crop(im, short: int, size: int):
    """A Pillow image -> its shorter side resized to `short` (bicubic; not if it is already), centre size x size."""
    from PIL import Image

    w, h = im.size
    nw, nh = max(short, round(w * short / min(w, h))), max(short, round(h * short / min(w, h)))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def convert_pil_mode(im, mode: str):
    """A Pillow image of any mode -> mode (L or RGB), as every image reader converts (this module's, the streamed path's
    pipeline.data.stream, the segmentation images'): palette transparency via RGBA, alpha dropped, 16-bit/float grey
    scaled."""
    from PIL import Image
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        arr = arr / 257 if im.mode.startswith("I;16") or arr.max() > 255 else arr
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert(mode)
