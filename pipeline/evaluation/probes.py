"""Evaluation protocols on a frozen encoder: weighted k-NN and a linear probe (MAE's BN head by default).

Features are computed once, with the encoder in eval mode and no augmentation: the cls token after the
final norm, or the mean of the patch tokens (`feature`), in the precision asked for (`precision`, see
pipeline.hardware: fp32, or bf16/fp16 autocast). The raw-pixel floor's features are the normalised images,
flattened (pixel_features), in fp32.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline import hardware
from pipeline.data.datasets import batches, normalize
from pipeline.models.encoder import Encoder
from pipeline.settings import Knn


@torch.inference_mode()
def extract_features(encoder: Encoder, images: torch.Tensor, mean, std, kind: str, precision: str = "fp32",
                     batch_size: int = 512, desc: str = "features", progress: bool = True) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> (N, D) float32 features, computed in `precision` (auto | fp32 | bf16 | fp16)
    on the encoder's device. images: a tensor or a stream (pipeline.data.datasets.batches: the eval transform)."""
    encoder.eval()
    device = next(encoder.parameters()).device
    amp = hardware.resolve(precision, str(device))
    out = []
    for batch in tqdm(batches(images, batch_size), desc=desc, unit="batch", file=sys.stderr, mininterval=2,
                      total=math.ceil(len(images) / batch_size), disable=not progress):
        x = normalize(hardware.to_device(batch, device), mean, std)
        with amp.autocast(encoder):
            out.append(encoder.features(x, kind).float().cpu())
    return torch.cat(out)


def pixel_features(images: torch.Tensor, mean, std, batch_size: int = 512) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> (N, C * H * W) float32: the images normalised with the train split's
    mean/std per channel (as every encoder sees them), flattened. The raw-pixel floor's features."""
    chunks = [normalize(batch, mean, std).flatten(1) for batch in batches(images, batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, math.prod(images.shape[1:]))


def online_knn_top1(encoder: Encoder, prep, knn: Knn, train_images: int, val_images: int) -> float:
    """k-NN top-1 (the probe `knn`: pretrain.online_knn's k, temperature, feature, precision) of the first
    `train_images` train images against the first `val_images` val images: the cheap convergence probe run during
    pre-training. The
    encoder's train/eval mode is restored; it draws no random numbers, so training is unchanged by it."""
    was_training = encoder.training
    feats = [extract_features(encoder, x[:n], prep.mean, prep.std, knn.feature, knn.precision, progress=False)
             for x, n in ((prep.train_x, train_images), (prep.val_x, val_images))]
    encoder.train(was_training)
    scores = knn_scores(feats[0], prep.train_y[:train_images], feats[1], knn.k, knn.temperature,
                        len(prep.class_names))
    return topk_accuracy(scores, prep.val_y[:val_images], ks=(1,))["top1"]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """scores (N, classes), labels (N,) -> {"top1": .., "top5": ..} as fractions."""
    ks = [k for k in ks if k <= scores.shape[1]]
    top = scores.topk(max(ks), dim=1).indices
    hit = top == labels[:, None]
    return {f"top{k}": hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def knn_scores(train_f, train_y, val_f, k: int, temperature: float, num_classes: int,
               chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN (as DINO): cosine similarity, k nearest, votes weighted by exp(sim / T)."""
    train_f = F.normalize(train_f, dim=1)
    k = min(k, len(train_f))
    scores = []
    for i in range(0, len(val_f), chunk):
        sim = F.normalize(val_f[i:i + chunk], dim=1) @ train_f.T            # (n, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def linear_probe(train_f, train_y, val_f, val_y, num_classes: int, epochs: int, batch_size: int,
                 lr: float, momentum: float, weight_decay: float, seed: int, head: str = "bn",
                 optimizer: str = "sgd") -> tuple[dict, list[dict]]:
    """A linear head on frozen features, trained with a cosine lr (per step) for `epochs`.

    head: "bn" = BatchNorm without affine parameters, then Linear (MAE's protocol) | "plain" = Linear only.
    optimizer: "sgd" (with momentum) | "lars" (MAE's: trust-ratio scaling of the weight matrix, not of the
    bias) | "adamw". weight_decay applies to the weight matrix only. Returns (final metrics, per-epoch
    history of train loss and val top-1).
    """
    gen = torch.Generator().manual_seed(seed)
    dim = train_f.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
    model = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear) if head == "bn" else linear
    opt = probe_optimizer(optimizer, linear, lr, momentum, weight_decay)
    steps = epochs * math.ceil(len(train_f) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    history = []
    for epoch in range(epochs):
        model.train()
        order, total = torch.randperm(len(train_f), generator=gen), torch.zeros(())
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(train_f[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)
        metrics = _evaluate(model, val_f, val_y)
        history.append({"epoch": epoch, "train_loss": total.item() / len(order), "val_top1": metrics["top1"]})
    return _evaluate(model, val_f, val_y), history


def probe_optimizer(name: str, linear: nn.Linear, lr: float, momentum: float, weight_decay: float):
    """The probe's optimiser: weight decay (and LARS's trust ratio) on the weight matrix, not the bias."""
    if name == "lars":
        from timm.optim import Lars  # timm's LARS; always_adapt: scale by the trust ratio even without wd (MAE)

        return Lars([{"params": [linear.weight], "weight_decay": weight_decay, "always_adapt": True},
                     {"params": [linear.bias], "weight_decay": 0.0, "always_adapt": False}],
                    lr=lr, momentum=momentum)
    groups = [{"params": [linear.weight], "weight_decay": weight_decay},
              {"params": [linear.bias], "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown probe optimizer {name!r} (sgd, lars, adamw)")


@torch.no_grad()
def _evaluate(head: nn.Module, val_f, val_y) -> dict:
    head.eval()
    return topk_accuracy(head(val_f), val_y)
