"""Typed settings: what a node resolves from its validated params at its boundary and hands to the library.

The stage CLIs (pipeline/stages) and each method module's `build` and `forward_flops` read the params dict; the
library below them (pipeline.models, .data, .train, .evaluation and the methods' classes) takes these objects or
plain arguments, and never reads params or names its sections (tests/test_layers.py). Each `of(params)` reads
exactly the keys its object holds, so the params-reads recorder (pipeline.orchestration.params_reads) records the
reads of the library's work at the boundary. Light: no torch (a stage CLI imports it before its check).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


def _pick(cls, section: dict):
    return cls(**{f.name: section[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Model:
    """params model: the ViT every method trains and its light decoder (timm.create_model's sizes)."""
    arch: str               # timm name; the sizes below override its own
    patch_size: int
    embed_dim: int          # encoder width
    depth: int              # encoder blocks
    num_heads: int          # encoder heads per block
    decoder_dim: int        # MAE-style decoder width
    decoder_depth: int      # decoder blocks
    decoder_heads: int      # decoder heads per block

    @classmethod
    def of(cls, params: dict) -> Model:
        return _pick(cls, params["model"])

    def config(self) -> dict:
        """The encoder config pipeline.models.encoder.Encoder takes (and an encoder file's sidecar records)."""
        return asdict(self)


@dataclass(frozen=True)
class Geometry:
    """What a method's networks are built for: the ViT's sizes, the image size (data.img_size) and the share of
    patches pre-training masks (pretrain.mask_ratio; a node's own pretrain keys over it: config.method_params)."""
    model: Model
    img_size: int
    mask_ratio: float

    @classmethod
    def of(cls, params: dict) -> Geometry:
        return cls(Model.of(params), params["data"]["img_size"], params["pretrain"]["mask_ratio"])


@dataclass(frozen=True)
class Loader:
    """DataLoader settings of a streamed dataset: worker processes, batches each prefetches, pinned memory."""
    workers: int = 0
    prefetch: int = 2
    pin: bool = False

    @classmethod
    def of(cls, params: dict, device: str) -> Loader:
        """launch.data_workers (null: min(8, this process's share of its cores - 1): the training processes of one
        machine share them), launch.prefetch_batches, pinned memory for CUDA."""
        import os

        from pipeline.ranks import world

        launch = params["launch"]
        workers = launch["data_workers"]
        if workers is None:
            workers = min(8, max(0, len(os.sched_getaffinity(0)) // world().size - 1))
        return cls(workers, launch["prefetch_batches"], device.startswith("cuda"))


@dataclass(frozen=True)
class Stream:
    """A streamed image folder (data.format stream, pipeline.data.stream): where and how its images are decoded."""
    path: str                       # data.path
    img_size: int                   # data.img_size
    channels: int                   # data.channels: 1 = grey, 3 = RGB
    skip_bad: bool = False          # data.bad_images == skip: an unreadable image is left out, not an error
    max_bad_images: int | None = None
    crop_scale: tuple[float, float] = (1.0, 1.0)   # pretrain.crop_scale, hflip: the training transform
    hflip: bool = False
    loader: Loader = Loader()

    @classmethod
    def folder(cls, data: dict, loader: Loader = Loader(), crop_scale=(1.0, 1.0), hflip: bool = False) -> Stream:
        """The folder of a data section (params data, or a benchmark's own) with the given transform and loader."""
        return cls(data["path"], data["img_size"], data["channels"], data.get("bad_images") == "skip",
                   data.get("max_bad_images"), tuple(crop_scale), hflip, loader)

    @classmethod
    def of(cls, params: dict) -> Stream:
        """A node's stream: data's folder, the train transform of pretrain.crop_scale and hflip (a training node's
        crops; the others read batches with the eval transform), the launch's loader."""
        from pipeline import hardware

        loader = Loader.of(params, hardware.device(params["launch"]["device"]))
        return cls.folder(params["data"], loader, params["pretrain"]["crop_scale"], params["pretrain"]["hflip"])


def stream(params: dict) -> Stream | None:
    """The node's stream when its data is a streamed folder (layout.data_format), else None: the tensor file."""
    from pipeline import layout

    return Stream.of(params) if layout.data_format(params["data"]) == "stream" else None


@dataclass(frozen=True)
class Knn:
    """A weighted k-NN probe (knn, pretrain.online_knn): the k nearest train features vote, weight exp(sim / T)."""
    k: int
    temperature: float
    feature: str            # cls | mean of the patch tokens
    precision: str          # features computed in: auto | fp32 | bf16 | fp16

    @classmethod
    def of(cls, section: dict) -> Knn:
        return _pick(cls, section)


@dataclass(frozen=True)
class Finetune:
    """Full fine-tuning, MAE's protocol (params finetune; pipeline.evaluation.finetune)."""
    epochs: int
    batch_size: int
    blr: float              # lr = blr * batch_size / 256
    layer_decay: float      # block i's lr scaled by layer_decay ** (depth + 1 - i)
    weight_decay: float
    label_smoothing: float  # when mixup and cutmix are off
    warmup_epochs: float
    min_lr: float
    clip_grad: float | None
    mixup: float            # timm Mixup alpha; 0 = off
    cutmix: float           # timm CutMix alpha; 0 = off
    randaug: str | None     # timm RandAugment config string; None = off
    precision: str          # auto | fp32 | bf16 | fp16

    @classmethod
    def of(cls, section: dict) -> Finetune:
        return _pick(cls, section)
