"""Evaluation protocols on a frozen encoder: weighted k-NN and a linear probe with MAE's BN head.

Features are computed once, with the encoder in eval mode and no augmentation: the cls token after the
final norm, or the mean of the patch tokens (`feature`), in fp32 or under bf16 autocast (`bf16`).
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.data import normalize
from pipeline.encoder import Encoder


@torch.inference_mode()
def extract_features(encoder: Encoder, images: torch.Tensor, mean, std, kind: str, bf16: bool = False,
                     batch_size: int = 512, desc: str = "features") -> torch.Tensor:
    """uint8 images (N, C, H, W) -> (N, D) float32 features (computed under bf16 autocast if bf16)."""
    encoder.eval()
    device = next(encoder.parameters()).device
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", file=sys.stderr, mininterval=2):
        x = normalize(images[i:i + batch_size], mean, std).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(encoder.features(x, kind).float().cpu())
    return torch.cat(out)


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
                 lr: float, momentum: float, weight_decay: float, seed: int) -> tuple[dict, list[dict]]:
    """BatchNorm (no affine) + Linear head (MAE protocol) trained with SGD + cosine lr on frozen features.

    Returns (final metrics, per-epoch history of train loss and val top-1).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Sequential(nn.BatchNorm1d(train_f.shape[1], affine=False, eps=1e-6),
                             nn.Linear(train_f.shape[1], num_classes))
        nn.init.trunc_normal_(head[1].weight, std=0.01)
        nn.init.zeros_(head[1].bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train_f) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    history = []
    for epoch in range(epochs):
        head.train()
        order, total = torch.randperm(len(train_f), generator=gen), 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        metrics = _evaluate(head, val_f, val_y)
        history.append({"epoch": epoch, "train_loss": total / len(order), "val_top1": metrics["top1"]})
    return _evaluate(head, val_f, val_y), history


@torch.no_grad()
def _evaluate(head: nn.Module, val_f, val_y) -> dict:
    head.eval()
    return topk_accuracy(head(val_f), val_y)
