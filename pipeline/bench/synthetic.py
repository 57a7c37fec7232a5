"""Synthetic image folders for the benchmarks: seeded, in CLASSES class folders, as an ImageFolder lays them out.

- make_folder: small grey PNGs of a noisy class digit (pipeline.bench.dataset: memory vs dataset size);
- make_jpegs: RGB JPEGs of ImageNet-like sizes that decode like photos (pipeline.bench.stream, its --make);
- link_folder: n more names for the same files (hard links), so a folder of n images costs no new pixels.
VAL_FRACTION and SPLIT_SEED: how the benchmarks split a made folder into train and val.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CLASSES = 10
GEN_SIZE = 32              # side of make_folder's PNGs; prepare resizes them to img_size
VAL_FRACTION, SPLIT_SEED = 0.2, 0
JPEG_SIZE = (400, 350)     # --make: ImageNet-like sizes, each side varied by up to JPEG_JITTER
JPEG_JITTER = 0.15
JPEG_QUALITY = 90


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """n grey GEN_SIZE x GEN_SIZE PNGs in CLASSES class folders (image i: class i % CLASSES, its digit drawn at a
    seeded offset and brightness, plus Gaussian noise); the same n and seed give the same files."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default(size=24)
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = i % CLASSES
        im = Image.new("L", (GEN_SIZE, GEN_SIZE))
        xy = (int(rng.integers(2, 16)), int(rng.integers(-4, 6)))
        ImageDraw.Draw(im).text(xy, str(label), fill=int(rng.integers(150, 256)), font=font)
        noisy = np.asarray(im, dtype=np.float64) + rng.normal(0, 16, (GEN_SIZE, GEN_SIZE))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / f"class{label}" / f"{i:07d}.png")
    return root


def make_jpegs(root: Path, n: int, seed: int = 0) -> Path:
    """n RGB JPEGs (quality JPEG_QUALITY) of about JPEG_SIZE (each side +-JPEG_JITTER) in CLASSES class folders
    (image i: class i % CLASSES): a smooth random colour field (a 4x4 grid, bicubic), a few filled shapes and Gaussian
    noise, so they decode like photos, not like flat colour. The same n and seed give the same files."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (int(round(s * (1 + rng.uniform(-JPEG_JITTER, JPEG_JITTER)))) for s in JPEG_SIZE)
        field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(field)
        for _ in range(int(rng.integers(3, 8))):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 10, (h, w, 3)).astype(np.float32)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            root / f"class{i % CLASSES}" / f"{i:07d}.jpg", quality=JPEG_QUALITY)
    return root


def image_files(folder: Path) -> list[Path]:
    """The image files (layout.is_image_name) under folder, sorted."""
    from pipeline.layout import is_image_name
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image_name(p.name))


def link_folder(files: list[Path], root: Path, n: int) -> Path:
    """root/<class>/<j>.<ext> for j < n, a hard link (a symbolic one across file systems) to files[j % len(files)],
    in that file's class folder: n distinct paths for the manifest, without writing n images."""
    for j in range(n):
        src = files[j % len(files)]
        dst = root / src.parent.name / f"{j:07d}{src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            os.symlink(src.resolve(), dst)
    return root
