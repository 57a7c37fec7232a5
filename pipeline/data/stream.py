"""Streamed image folders (data.format stream): a manifest instead of pixels; images decoded when read.

Inputs: an image folder (data.path: class folders, optionally under train/ and val/; pipeline.data.datasets splits it as
for the tensor format) and the params. Outputs:
- prepare_manifest(data, seed) -> Manifest; save_manifest writes results/prepare_data/manifest.jsonl, one JSON
  line per image {"split", "path" (relative to data.path), "label", "size" (bytes)}, train then val, and its
  sidecar manifest.json (pipeline.checkpoint's convention: the jsonl's sha256, also its dataset_hash, plus class
  names, per-channel mean/std, counts, and the files skipped for lacking an image extension, per extension).
  mean/std: of STATS_IMAGES train images drawn with a fixed seed (data.split_seed), through the eval transform.
- load(images: pipeline.settings.Stream) -> data.Prepared whose train_x / val_x are StreamImages: the manifest's
  sha256 is checked against its sidecar; each image file's size is checked against the manifest when it is opened
  (never its pixels' hash). A missing or resized image is a one-line PipelineError; so is an unreadable one
  (truncated, empty, not an image) under data.bad_images: stop. Under skip it is replaced by the next readable image
  of its split (index i -> i+1, i+2, ... with i's crop draws): a function of the index alone, so a resumed run sees
  the same batches. The unreadable files are counted (distinct files, in the node's process: bad_images()) and, past
  data.max_bad_images, stop the node in one line.
- StreamImages: len, shape (N, C, S, S), [slice | indices] -> a sub-split; batches(bs) -> uint8 (B, C, S, S) in
  order with the eval transform (shorter side to round(S / 0.875), centre crop S: MAE's 256/224);
  train_batches(order, bs, seed, rows, start, total) -> per step (uint8 batch, labels) with MAE's train transform
  (RandomResizedCrop(S, crop_scale, ratio 3/4..4/3, bicubic) + horizontal flip), for the rows `rows` of the global
  batch of order(n, bs, seed, step) (steps.batch_indices, given by the trainer): the same rows as the tensor path
  gives this DDP rank.
Determinism: every draw of train item i in epoch e comes from numpy's generator seeded by (seed, e, i), so a
resumed run sees the crops of an uninterrupted one, whatever the number of workers. Decoding: JPEGs with
torchvision.io.decode_jpeg, then torchvision's antialiased bicubic resize on the uint8 tensor: 2.2x Pillow's
decode + resize on a 2-core AVX2 EPYC (400x350 q90 JPEGs to a 224 crop, one thread: 958 vs 435 images/s; decoding
alone is equal, 1586 vs 1571/s; Pillow's bicubic resize is the slow part), and the same pixels (mean |difference|
0.01 of 255); other formats through Pillow.
Workers: launch.data_workers processes per training process (null: min(8, its share of the cores - 1)),
launch.prefetch_batches batches ahead each, pinned memory on CUDA; a worker dies with its process (even SIGKILLed).

DVC tracks the raw folder outside this module: `dvc add data/<folder>` (its .dvc file then is a dep of
prepare_data), or an import stage that writes it; the manifest's sizes catch a folder changed behind its back.
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from pipeline import checkpoint, layout
from pipeline.data.folders import pil_to_tensor
from pipeline.errors import PipelineError
from pipeline.settings import Loader, Stream

if TYPE_CHECKING:
    from pipeline.data.datasets import Prepared

STATS_IMAGES = 2048          # train images whose pixels give the channel mean/std
EVAL_CROP = 0.875            # eval: shorter side to size / 0.875, centre crop (MAE: 256 -> 224)
RATIO = (3 / 4, 4 / 3)       # RandomResizedCrop's aspect-ratio range
# torchvision 0.29 warns on every decode that its decoders will move to TorchCodec (not installed here)
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)


@dataclass
class Manifest:
    """Relative paths (numpy bytes arrays: no per-item Python objects in forked workers), sizes, labels per split."""
    paths: dict[str, np.ndarray]
    sizes: dict[str, np.ndarray]
    labels: dict[str, torch.Tensor]
    class_names: list[str]
    skipped: dict[str, int]      # non-image files left out, per extension (pipeline.data.folders.image_files)

    @classmethod
    def of(cls, rows: dict[str, list[tuple[str, int, int]]], class_names: list[str],
           skipped: dict[str, int]) -> Manifest:
        """From {split: [(relative path, size, label), ...]}."""
        return cls({s: np.array([p.encode() for p, _, _ in r], dtype=bytes) for s, r in rows.items()},
                   {s: np.array([b for _, b, _ in r], dtype=np.int64) for s, r in rows.items()},
                   {s: torch.tensor([y for _, _, y in r], dtype=torch.int64) for s, r in rows.items()},
                   list(class_names), skipped)


# ---- the manifest -----------------------------------------------------------------------------------------

def scan(data: dict, seed: int) -> Manifest:
    """The image folder's split (pipeline.data.folders.split_folder, as the tensor format's) of image files, with
    their sizes (one stat each); other files skipped and counted per extension."""
    from pipeline.data.folders import data_folder, split_folder

    root, skipped = data_folder(data), {}
    train, val = split_folder(root, data["val_fraction"], seed, skipped)
    if not any(val.values()):
        raise PipelineError(f"{root}: the val split is empty (too few images per class for val_fraction)")
    rows = {"train": [], "val": []}
    with tqdm(total=sum(len(f) for split in (train, val) for f in split.values()), desc="prepare_data listing",
              unit="file", file=sys.stderr, mininterval=2) as bar:
        for split, classes in (("train", train), ("val", val)):
            for label, files in enumerate(classes.values()):
                rows[split] += [(str(f.relative_to(root)), f.stat().st_size, label) for f in files]
                bar.update(len(files))
    return Manifest.of(rows, list(train), skipped)


def channel_stats(man: Manifest, images: Stream, seed: int) -> tuple[list, list]:
    """Per-channel mean/std (of x / 255) of STATS_IMAGES train images (a fixed seeded sample), eval transform."""
    from pipeline.data.datasets import tensor_channel_stats

    n = len(man.labels["train"])
    pick = np.sort(np.random.default_rng(seed).choice(n, min(n, STATS_IMAGES), replace=False))
    sample = split_images(man, "train", images)[torch.from_numpy(pick)]
    return tensor_channel_stats(sample.tensor(desc="prepare_data channel stats"))


def lines(man: Manifest) -> list[str]:
    return [json.dumps({"split": s, "path": p.decode(), "label": int(y), "size": int(b)})
            for s in ("train", "val") for p, b, y in zip(man.paths[s], man.sizes[s], man.labels[s].tolist())]


def save_manifest(man: Manifest, path: Path, meta: dict) -> dict:
    """manifest.jsonl (atomic) + its sidecar (sha256 = dataset_hash, meta); returns the sidecar dict."""
    text = "\n".join(lines(man)) + "\n"
    checkpoint.atomic_write(path, lambda p: p.write_text(text))
    digest = checkpoint.sha256_file(path)
    k = len(man.class_names)
    meta = dict(meta, format="stream", class_names=man.class_names, skipped_files=sum(man.skipped.values()),
                skipped_extensions=dict(sorted(man.skipped.items())),
                counts={s: len(man.labels[s]) for s in ("train", "val")},
                class_counts={s: torch.bincount(man.labels[s], minlength=k).tolist() for s in ("train", "val")},
                dataset_hash=digest, sha256=digest, file=path.name)
    checkpoint.write_json(layout.sidecar(path), meta)
    return meta


def read_manifest(path: Path = layout.MANIFEST) -> tuple[Manifest, dict]:
    """The manifest and its sidecar, sha256-verified; anything missing, corrupt or malformed -> PipelineError."""
    if not path.is_file():
        raise PipelineError(f"missing input {path}: run prepare_data first")
    meta = checkpoint.read_json(layout.sidecar(path))
    if not isinstance(meta, dict) or not all(k in meta for k in ("sha256", "class_names", "mean", "std")):
        raise PipelineError(f"{layout.sidecar(path)} is not the sidecar of a manifest; rerun prepare_data")
    if checkpoint.sha256_file(path) != meta["sha256"]:
        raise PipelineError(f"{path} is corrupt: its sha256 does not match {layout.sidecar(path)}")
    rows = {"train": [], "val": []}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        e = _entry(line, path, i, len(meta["class_names"]))
        rows[e["split"]].append((e["path"], e["size"], e["label"]))
    return Manifest.of(rows, meta["class_names"], meta.get("skipped_extensions", {})), meta


def _entry(line: str, path: Path, i: int, k: int) -> dict:
    try:
        e = json.loads(line)
        ok = (e["split"] in ("train", "val") and isinstance(e["path"], str) and isinstance(e["size"], int)
              and isinstance(e["label"], int) and 0 <= e["label"] < k)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise PipelineError(f"{path} line {i} is not a manifest entry (split, path, label in [0, {k}), size); "
                            "rerun prepare_data")
    return e


def load(images: Stream) -> Prepared:
    """The streamed dataset (manifest verified): Prepared with StreamImages as train_x and val_x."""
    from pipeline.data.datasets import Prepared

    man, meta = read_manifest()
    x = {s: split_images(man, s, images) for s in ("train", "val")}
    return Prepared(x["train"], man.labels["train"], x["val"], man.labels["val"], man.class_names, meta["mean"],
                    meta["std"], meta.get("source", str(Path(images.path))))


def split_images(man: Manifest, split: str, images: Stream) -> StreamImages:
    """The split's images as `images` (pipeline.settings.Stream) decodes, transforms and loads them."""
    files = _Files(str(images.path), man.paths[split], man.sizes[split], man.labels[split],
                   "L" if images.channels == 1 else "RGB", images.img_size, tuple(images.crop_scale), images.hflip,
                   images.skip_bad, images.max_bad_images)
    return StreamImages(files, np.arange(len(man.paths[split])), images.loader)


# ---- decoding and transforms ---------------------------------------------------------------------------

class _Files(torch.utils.data.Dataset):
    """Item i -> (uint8 (C, S, S) with the eval transform, label); item (seed, epoch, i) -> the train transform."""

    def __init__(self, root, paths, sizes, labels, mode, size, crop_scale, hflip, skip_bad, max_bad):
        self.root, self.paths, self.sizes, self.labels = root, paths, sizes, labels
        self.mode, self.size, self.crop_scale, self.hflip = mode, size, crop_scale, hflip
        self.skip_bad, self.max_bad = skip_bad, max_bad

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        """(uint8 image, its label, the unreadable files it skipped: "\n"-joined relative paths, "" if none)."""
        i = key[2] if isinstance(key, tuple) else key
        skipped = []
        for j in (i + k for k in range(len(self.paths))):       # under skip: the next readable image
            j %= len(self.paths)
            try:
                x = read_image(os.path.join(self.root, self.paths[j].decode()), int(self.sizes[j]), self.mode)
                break
            except UnreadableImage as e:
                if not self.skip_bad:
                    raise
                skipped.append(f"{self.paths[j].decode()}\t{str(e).rsplit(': ', 1)[-1]}")
        else:
            raise PipelineError(f"no image of {self.root} is readable (data.bad_images: skip)")
        if isinstance(key, tuple):
            x = train_transform(x, self.size, self.crop_scale, self.hflip, np.random.default_rng(list(key)))
        else:
            x = eval_transform(x, self.size)
        return x, self.labels[j], "\n".join(skipped)

    def count_bad(self, skipped: list[str]) -> None:
        """Record the unreadable files of a batch (bad_images); past max_bad distinct files, a PipelineError."""
        for entry in filter(None, (line for s in skipped for line in s.split("\n"))):
            path, reason = entry.split("\t", 1)
            _bad.setdefault(path, reason)
        if self.max_bad is not None and len(_bad) > self.max_bad:
            names = bad_images()
            raise PipelineError(f"{len(names)} unreadable images in {self.root}, more than data.max_bad_images "
                                f"({self.max_bad}): {', '.join(names[:3])}{', ...' if len(names) > 3 else ''} "
                                f"({_bad[names[0]]}); remove or replace them, or raise the limit")


class UnreadableImage(PipelineError):
    """An image file that no decoder reads (truncated, empty, not an image): data.bad_images decides."""


_bad: dict[str, str] = {}        # unreadable files met by this process's loaders: relative path -> reason


def bad_images() -> list[str]:
    """The unreadable images skipped so far in this process (data.bad_images: skip), relative to data.path, sorted."""
    return sorted(_bad)


def bad_record(earlier=()) -> dict:
    """What a node's metrics.json says of the unreadable images it skipped (with `earlier`: those an interrupted
    attempt of it met): {"bad_images": {"count", "files"}}, or {} when there were none."""
    names = sorted(set(bad_images()) | set(earlier))
    return {"bad_images": {"count": len(names), "files": names}} if names else {}


def log_bad_images(run, record: dict) -> None:
    """bad_record's files on the node's MLflow run (metric bad_images, tag bad_images: the names) and one note line."""
    if record:
        names = record["bad_images"]["files"]
        run.log_metrics({"bad_images": len(names)})
        run.set_tags({"bad_images": ", ".join(names)[:5000]})
        print(f"note: {len(names)} unreadable images skipped (data.bad_images: skip): {', '.join(names[:5])}"
              f"{', ...' if len(names) > 5 else ''}", file=sys.stderr)


def read_image(path: str, size: int, mode: str) -> torch.Tensor:
    """The file (its size checked against the manifest) -> uint8 (C, H, W) in mode L or RGB, full resolution,
    EXIF-rotated. JPEGs: torchvision's decoder; other formats, and what it refuses: Pillow (pipeline.data.datasets)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise PipelineError(f"missing image {path} (listed in the manifest); rerun prepare_data") from None
    if len(raw) != size:
        raise PipelineError(f"{path} has {len(raw)} bytes, the manifest says {size}: the folder changed since "
                            "prepare_data; rerun it")
    if raw[:3] == b"\xff\xd8\xff":
        try:
            return decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), apply_exif_orientation=True,
                               mode=ImageReadMode.GRAY if mode == "L" else ImageReadMode.RGB)
        except RuntimeError:
            pass                  # e.g. a truncated file: Pillow reads it or says why not
    return _pillow(raw, path, mode)


def _pillow(raw: bytes, path: str, mode: str) -> torch.Tensor:
    from PIL import Image, ImageOps

    from pipeline.data.folders import convert_pil_mode

    try:
        with Image.open(io.BytesIO(raw)) as im:
            return pil_to_tensor(convert_pil_mode(ImageOps.exif_transpose(im), mode))
    except Exception as e:   # Pillow raises many types for corrupt files
        raise UnreadableImage(f"cannot read image {path}: {e}") from None


def crop_box(w: int, h: int, scale: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (10 tries, then a centre crop of the clamped ratio), drawn from rng:
    (left, top, width, height)."""
    log_r = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target, ratio = w * h * rng.uniform(*scale), math.exp(rng.uniform(*log_r))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return left, top, cw, ch
    cw, ch = w, h
    if w / h < RATIO[0]:
        ch = round(w / RATIO[0])
    elif w / h > RATIO[1]:
        cw = round(h * RATIO[1])
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 (C, h0, w0) -> uint8 (C, h, w): bicubic with antialiasing (torchvision), unchanged if the size is."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    return x if tuple(x.shape[-2:]) == (h, w) else resize(x, [h, w], InterpolationMode.BICUBIC, antialias=True)


def train_transform(x: torch.Tensor, size: int, scale, hflip: bool, rng: np.random.Generator) -> torch.Tensor:
    """MAE's pre-training transform: RandomResizedCrop(size, scale, 3/4..4/3, bicubic), then a flip (p 1/2)."""
    left, top, cw, ch = crop_box(x.shape[-1], x.shape[-2], scale, rng)
    x = _resize(x[:, top:top + ch, left:left + cw], size, size)
    flip = rng.random() < 0.5
    return x.flip(-1) if hflip and flip else x.contiguous()


def eval_transform(x: torch.Tensor, size: int) -> torch.Tensor:
    """MAE's eval transform: shorter side to round(size / 0.875) (bicubic), centre crop size x size."""
    h, w = x.shape[-2:]
    short = round(size / EVAL_CROP)
    nw, nh = max(short, round(w * short / min(w, h))), max(short, round(h * short / min(w, h)))
    top, left = (nh - size) // 2, (nw - size) // 2
    return _resize(x, nh, nw)[:, top:top + size, left:left + size].contiguous()


# ---- a split as an image source -------------------------------------------------------------------------

class StreamImages:
    """A streamed split (or a subset of it, by position) where the tensor path has a uint8 (N, C, S, S) tensor."""
    dtype = torch.uint8

    def __init__(self, files: _Files, index: np.ndarray, loader: Loader):
        self.files, self.index, self.loader = files, index, loader

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self), 1 if self.files.mode == "L" else 3, self.files.size, self.files.size

    def __getitem__(self, key) -> StreamImages:
        key = key.numpy() if isinstance(key, torch.Tensor) else key
        return StreamImages(self.files, self.index[key], self.loader)

    def batches(self, batch_size: int):
        """uint8 batches (eval transform) in order."""
        chunks = [self.index[i:i + batch_size].tolist() for i in range(0, len(self), batch_size)]
        return (x for x, _ in _iterate(self._loader(chunks), self.files))

    def tensor(self, desc: str | None = None) -> torch.Tensor:
        """Every image decoded (eval transform) into one uint8 tensor: for small subsets."""
        out = torch.empty(self.shape, dtype=torch.uint8)
        bar = tqdm(total=len(self), desc=desc, unit="img", file=sys.stderr, mininterval=2, disable=desc is None)
        i = 0
        for x in self.batches(256):
            out[i:i + len(x)] = x
            i += len(x)
            bar.update(len(x))
        bar.close()
        return out

    def train_batches(self, order, batch_size: int, seed: int, rows: slice, start: int, total: int):
        """Steps start..total-1: (uint8 batch, labels) of this process's rows of order(n, bs, seed, step) (the
        trainer's, pipeline.data.steps.batch_indices), each image with the train transform drawn from
        (seed, epoch, index)."""
        return _iterate(self._loader(_Steps(self.index, batch_size, seed, rows, start, total, order)), self.files)

    def _loader(self, batches: list):
        from torch.utils.data import DataLoader

        workers = min(self.loader.workers, len(batches))
        extra = {"prefetch_factor": self.loader.prefetch, "persistent_workers": True} if workers else {}
        return DataLoader(self.files, batch_sampler=batches, num_workers=workers,
                          pin_memory=self.loader.pin,
                          worker_init_fn=functools.partial(_die_with_parent, os.getpid()), **extra)


def _die_with_parent(parent: int, worker: int) -> None:
    """A decoding worker ends with the node's process, even a SIGKILLed one (Linux: PR_SET_PDEATHSIG), so it never
    outlives it holding the node's lock (pipeline.orchestration.cli.exclusive's flock, inherited by the fork) for a
    rerun."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)       # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:                       # the parent died before the line above
            os._exit(0)


class _Steps:
    """The batch sampler of train_batches: per step, the keys (seed, epoch, index) of this process's rows, made
    lazily (ImageNet's 800 epochs hold a billion keys)."""

    def __init__(self, index, batch_size, seed, rows, start, total, batch_indices):
        self.index, self.bs, self.seed, self.rows = index, batch_size, seed, rows
        self.start, self.total, self.batch_indices = start, total, batch_indices

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self):
        n = len(self.index)
        spe = n // min(self.bs, n)
        for step in range(self.start, self.total):
            yield [(self.seed, step // spe, int(self.index[i]))
                   for i in self.batch_indices(n, self.bs, self.seed, step)[self.rows]]


def _iterate(loader, files: _Files):
    """Iterate a DataLoader: (images, labels) per batch, its unreadable files counted (_Files.count_bad); a worker's
    PipelineError comes back as its own one-line message."""
    try:
        for x, y, skipped in loader:
            files.count_bad(skipped)
            yield x, y
    except PipelineError as e:
        message = str(e)
        if "\nOriginal Traceback" in message:     # a worker's, re-raised by the DataLoader with the worker's traceback:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]   # its last line, "<module>.<class>: <it>"
        raise PipelineError(message) from None
