"""Full fine-tuning of a pre-trained encoder, MAE's protocol (its main_finetune.py / models_vit.py):

- model: a timm VisionTransformer of the encoder's architecture with global average pooling of the patch
  tokens, a new LayerNorm after the pooling (fc_norm) and a new linear head (trunc-normal, std 2e-5, zero
  bias); stochastic depth finetune.drop_path (linear in depth, timm's drop_path_rate). The pre-trained cls
  token, patch embedding, positions and blocks are loaded; the encoder's final norm is dropped (with
  fc_norm timm's ViT has no `norm`). The fixed sin-cos positions stay frozen, as in pre-training.
- optimiser: AdamW (timm's create_optimizer_v2) with layer-wise lr decay (timm's param_groups_layer_decay:
  block i of d gets lr * layer_decay^(d - i), the patch embedding / cls token layer_decay^(d + 1), fc_norm
  and head 1) and no weight decay on norms, biases and tokens; lr = blr * batch / 256, per step a linear
  warm-up then a half-cosine to min_lr (pipeline.train.engine.lr_schedule), times each group's lr_scale.
- data: timm RandAugment (finetune.randaug) per image on PIL images (grey images go through RGB and back),
  normalised with the training split's mean/std; timm Mixup/CutMix + SoftTargetCrossEntropy when
  finetune.mixup or cutmix > 0, else label-smoothed cross-entropy. MAE's RandomResizedCrop, flip and
  RandomErasing are not applied (digits: the pre-training crops already cover scale; flips change digits).
- determinism: every random draw of step t (RandAugment, Mixup: python `random` and numpy; drop path: torch)
  is seeded from (seed, t) as in pipeline.train.engine, and the epoch's order from (seed, epoch); the global RNG
  states are restored afterwards. Two runs with the same seed give the same model on CPU.
- every epoch: top-1/top-5 on the val split (full image, eval mode); the last epoch's are the result.

The fine-tuned model is saved as the plain timm state dict of that ViT (with a head) plus a sidecar holding
its config and class count (save_model / load_model), so the robustness node can rebuild it.
"""
from __future__ import annotations

import random
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from pipeline import hardware
from pipeline.checkpoint import load_tensors, save_tensors
from pipeline.data.datasets import Prepared, normalize
from pipeline.errors import PipelineError
from pipeline.evaluation.probes import extract_features, topk_accuracy
from pipeline.models.encoder import Encoder
from pipeline.models.encoder_file import state_mismatch
from pipeline.settings import Finetune
from pipeline.train import engine

HEAD_STD = 2e-5                 # MAE: trunc_normal_(head.weight, std=2e-5)


class Classifier(nn.Module):
    """A timm ViT with a head, avg pooling and fc_norm. features(x, "logits") is the head's output (B, classes),
    features(x, "pooled") the normalised pooled features (B, D); the state dict is `vit`'s, a plain timm one."""

    def __init__(self, config: dict, num_classes: int, drop_path: float = 0.0):
        super().__init__()
        self.config, self.num_classes = dict(config), num_classes
        self.vit = timm.create_model(
            config["arch"], pretrained=False, num_classes=num_classes, img_size=config["img_size"],
            in_chans=config["in_chans"], patch_size=config["patch_size"], embed_dim=config["embed_dim"],
            depth=config["depth"], num_heads=config["num_heads"], global_pool="avg", fc_norm=True,
            drop_path_rate=drop_path)
        self.vit.pos_embed.requires_grad_(False)          # fixed sin-cos positions (loaded), as pre-training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def features(self, x: torch.Tensor, kind: str = "logits") -> torch.Tensor:
        return self.vit(x) if kind == "logits" else self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)


def from_encoder(encoder: Encoder, num_classes: int, drop_path: float, seed: int) -> Classifier:
    """The fine-tuning model of a pre-trained encoder: its weights, a new fc_norm and head (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(encoder.config, num_classes, drop_path)
        nn.init.trunc_normal_(model.vit.head.weight, std=HEAD_STD)
        nn.init.zeros_(model.vit.head.bias)
    # timm's ViT with global_pool="avg", fc_norm=True has norm = Identity (no norm.* keys) and expects
    # fc_norm.{weight,bias} + head.{weight,bias} beyond the encoder's keys: the encoder's final norm.* is
    # dropped (MAE's interpolate/load with fc_norm), fc_norm and head stay newly initialised.
    state = {k: v for k, v in encoder.vit.state_dict().items() if not k.startswith("norm.")}
    result = model.vit.load_state_dict(state, strict=False)
    new = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    if set(result.missing_keys) != new or result.unexpected_keys:
        raise PipelineError(f"the encoder does not fit the fine-tuning ViT: missing {result.missing_keys}, "
                            f"unexpected {result.unexpected_keys}")
    return model


def save_model(path, model: Classifier, meta: dict) -> dict:
    """model.vit's timm state dict as safetensors; the sidecar holds the model config and num_classes."""
    return save_tensors(path, model.vit.state_dict(), dict(meta, model=model.config, num_classes=model.num_classes,
                                                         head={"global_pool": "avg", "fc_norm": True}))


def load_model(path) -> tuple[Classifier, dict]:
    """A fine-tuned model written by save_model (sha256-verified), in eval mode; a mismatch is a PipelineError."""
    tensors, meta = load_tensors(path)
    if "model" not in meta or "num_classes" not in meta:
        raise PipelineError(f"{path} has no fine-tuned model config in its sidecar; rerun finetune")
    model = Classifier(meta["model"], meta["num_classes"])
    problems = state_mismatch(model.vit.state_dict(), tensors)
    if problems:
        raise PipelineError(f"{path} does not fit the model its sidecar describes: {problems}")
    model.vit.load_state_dict(tensors)
    return model.eval(), meta


def optimizer(model: Classifier, lr: float, weight_decay: float, layer_decay: float) -> torch.optim.Optimizer:
    """timm's AdamW (torch.optim.AdamW) with layer-decay groups (each with its `lr_scale`); no wd on 1-D params
    and tokens. fused=True: one kernel per tensor (on the shared 2-core CPU the default per-op loop took up to
    2 s per step when other processes held a core, the fused step 5-12 ms)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model.vit, "adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay,
                               fused=True)


def peak_lr(settings: Finetune, batch_size: int) -> float:
    return settings.blr * batch_size / 256


def randaug_transform(config: str | None, img_size: int, mean: list[float]):
    """timm RandAugment from its config string (e.g. rand-m9-mstd0.5-inc1), with MAE's hparams; None = off."""
    if not config:
        return None
    from timm.data.auto_augment import rand_augment_transform

    fill = [min(255, round(255 * m)) for m in mean]
    fill = fill * 3 if len(fill) == 1 else fill               # grey images are augmented as RGB
    transform = rand_augment_transform(config, {"translate_const": int(img_size * 0.45), "img_mean": tuple(fill),
                                                "interpolation": Image.BICUBIC})
    for op in transform.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, where keeping 0 bits (PosterizeIncreasing at magnitude 10) gives a black image as
    Pillow < 13 did; Pillow 13's ImageOps.posterize raises for 0 bits."""
    from timm.data.auto_augment import posterize

    return Image.new(img.mode, img.size) if bits_to_keep < 1 else posterize(img, bits_to_keep, **kwargs)


def randaugment(images: torch.Tensor, transform) -> torch.Tensor:
    """uint8 (B, C, H, W), C = 1 or 3 -> the same shape, each image through transform as a PIL RGB image
    (grey: replicated to RGB, back to L afterwards). Draws from python `random` and numpy's global RNG."""
    out = torch.empty_like(images)
    for i, img in enumerate(images):
        arr = img.permute(1, 2, 0).numpy()
        pil = transform(Image.fromarray(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr, "RGB"))
        res = np.asarray(pil.convert("L"))[..., None] if images.shape[1] == 1 else np.asarray(pil.convert("RGB"))
        out[i] = torch.from_numpy(res.copy()).permute(2, 0, 1)
    return out


def mixup_fn(settings: Finetune, num_classes: int):
    """timm Mixup/CutMix (MAE's prob 1, switch 0.5, batch mode, label smoothing inside the soft targets) or None."""
    if not (settings.mixup > 0 or settings.cutmix > 0):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=settings.mixup, cutmix_alpha=settings.cutmix, prob=1.0, switch_prob=0.5,
                 mode="batch", label_smoothing=settings.label_smoothing, num_classes=num_classes)


def loss_fn(settings: Finetune, mixup):
    """(logits, targets) -> loss: timm SoftTargetCrossEntropy on Mixup's soft targets, else label-smoothed CE."""
    if mixup is not None:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=settings.label_smoothing)


@contextmanager
def restored_rng():
    """Leave python's, numpy's and torch's (CPU) global RNG states as they were."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def seed_step(seed: int, step: int) -> None:
    """Seed every global RNG a step draws from (RandAugment, Mixup, drop path) from (seed, step)."""
    s = engine.stream_key(seed) * 1_000_003 + step            # pipeline.train.engine.step_generator's stream
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def train_batch(images: torch.Tensor, labels: torch.Tensor, prep: Prepared, transform, mixup, device: str):
    """One step's uint8 images -> (normalised inputs, targets) on device: RandAugment, normalise, Mixup."""
    x = randaugment(images, transform) if transform is not None else images
    x, y = normalize(hardware.to_device(x, device), prep.mean, prep.std), hardware.to_device(labels, device)
    return mixup(x, y) if mixup is not None else (x, y)


def evaluate(model: Classifier, images: torch.Tensor, labels: torch.Tensor, mean, std, precision: str = "fp32",
             desc: str = "finetune val") -> dict:
    """{"top1", "top5"} of the model on uint8 images (full image, eval mode), computed in `precision`."""
    return topk_accuracy(extract_features(model, images, mean, std, "logits", precision, desc=desc), labels)


def finetune(model: Classifier, prep: Prepared, settings: Finetune, seed: int, device: str | None = None,
             on_epoch=lambda h: None, desc: str = "finetune") -> tuple[dict, list[dict]]:
    """Fine-tune `model` on prep's train split with the finetune settings; returns (the last epoch's val
    metrics {"top1", "top5"}, history [{"epoch", "train_loss", "val_top1", "lr"}, ...]). on_epoch(entry) is
    called after each epoch."""
    device = device or hardware.device()
    amp = hardware.resolve(settings.precision, device)
    model.to(device)
    n, k = len(prep.train_y), len(prep.class_names)
    bs = min(settings.batch_size, n)
    spe = n // bs
    lr = peak_lr(settings, bs)
    sched = SimpleNamespace(epochs=settings.epochs, warmup_epochs=settings.warmup_epochs, lr=lr,
                            min_lr=settings.min_lr)
    lrs = engine.lr_schedule(sched, spe)                      # reads only these four fields of a TrainConfig
    opt = optimizer(model, lr, settings.weight_decay, settings.layer_decay)
    scaler = amp.grad_scaler()                                # fp16 only; a pass-through otherwise
    transform = randaug_transform(settings.randaug, prep.train_x.shape[-1], prep.mean)
    mixup = mixup_fn(settings, k)
    criterion = loss_fn(settings, mixup)
    trained = [p for g in opt.param_groups for p in g["params"]]
    history, metrics = [], {}
    bar = tqdm(total=settings.epochs * spe * bs, unit="img", unit_scale=True, desc=desc, file=sys.stderr,
               mininterval=2.0, smoothing=0.1, dynamic_ncols=True)
    batches = engine.step_batches(prep.train_x, prep.train_y, bs, seed, slice(None), 0, settings.epochs * spe)
    with restored_rng():
        for epoch in range(settings.epochs):
            model.train()
            loss_sum = torch.zeros((), device=device)
            for step in range(epoch * spe, (epoch + 1) * spe):
                seed_step(seed, step)
                images, labels, _ = next(batches)       # a stream's: with the train transform (crop, flip)
                x, y = train_batch(images, labels, prep, transform, mixup, device)
                for group in opt.param_groups:
                    group["lr"] = lrs[step].item() * group.get("lr_scale", 1.0)
                with amp.autocast(model):
                    logits = model(x)
                loss = criterion(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if settings.clip_grad:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(trained, settings.clip_grad)
                scaler.step(opt)
                scaler.update()
                loss_sum += loss.detach()
                bar.update(bs)
            train_loss = (loss_sum / spe).item()
            if not np.isfinite(train_loss):
                raise PipelineError(f"non-finite fine-tuning loss ({train_loss}) in epoch {epoch}; "
                                    "lower finetune.blr or change finetune.precision")
            metrics = evaluate(model, prep.val_x, prep.val_y, prep.mean, prep.std, amp.name)
            entry = {"epoch": epoch, "train_loss": train_loss, "val_top1": metrics["top1"],
                     "lr": lrs[(epoch + 1) * spe - 1].item()}
            history.append(entry)
            on_epoch(entry)
    bar.close()
    return metrics, history


def plot_curve(history: list[dict], path, title: str) -> None:
    """curve.png: train loss (left axis) and val top-1 (%, right axis) per epoch."""
    from matplotlib.figure import Figure

    from pipeline.plots import save_png

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    epochs = [h["epoch"] + 1 for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    ax.grid(alpha=0.3)
    acc = ax.twinx()
    acc.plot(epochs, [100 * h["val_top1"] for h in history], "s--", color="tab:red", label="val top-1")
    acc.set_ylabel("val top-1 (%)", color="tab:red")
    ax.set_xticks(epochs)
    ax.set_title(title)
    save_png(fig, path)
