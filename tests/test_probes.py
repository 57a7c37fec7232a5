"""The k-NN probes of pipeline/evaluation/probes.py against independent computations: DINO's weighted k-NN (cosine
similarity of per-feature-normalised vectors, the k nearest vote with weight exp(sim / T)), and the online probe run
during pre-training (train features against val features, extracted with the probe's feature kind and precision,
without a progress bar of its own)."""
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from pipeline.evaluation import probes
from pipeline.models.encoder import build_encoder
from pipeline.settings import Knn

MODEL = dict(arch="vit_tiny_patch16_224", patch_size=2, embed_dim=32, depth=2, num_heads=2)


def test_knn_scores_are_dinos_weighted_vote():
    gen = torch.Generator().manual_seed(0)
    train_f, val_f = torch.randn(12, 5, generator=gen) * 3, torch.randn(4, 5, generator=gen)
    train_y = torch.arange(12) % 3
    expected = torch.zeros(4, 3)
    for i, v in enumerate(val_f):
        sim = torch.stack([F.cosine_similarity(v, t, dim=0) for t in train_f])
        top = sim.topk(4)
        for s, j in zip(top.values, top.indices):
            expected[i, train_y[j]] += (s / 0.07).exp()
    scores = probes.knn_scores(train_f, train_y, val_f, k=4, temperature=0.07, num_classes=3)
    assert torch.allclose(scores, expected, rtol=1e-4)


def test_online_knn_top1_probes_train_against_val_with_the_probes_settings(monkeypatch):
    encoder = build_encoder(MODEL, 8, 1, seed=0)
    gen = torch.Generator().manual_seed(1)
    prep = SimpleNamespace(train_x=torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8, generator=gen),
                           val_x=torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8, generator=gen),
                           train_y=torch.arange(30) % 4, val_y=torch.arange(20) % 4, mean=[0.5], std=[0.25],
                           class_names=list("abcd"))
    knn = Knn(k=5, temperature=0.1, feature="mean", precision="bf16")
    calls, extract = [], probes.extract_features

    def recorded(enc, images, mean, std, kind, precision="fp32", **kw):
        calls.append((len(images), kind, precision, kw.get("progress", True)))
        return extract(enc, images, mean, std, kind, precision, **kw)

    monkeypatch.setattr(probes, "extract_features", recorded)
    top1 = probes.online_knn_top1(encoder.train(), prep, knn, train_images=24, val_images=12)
    assert calls == [(24, "mean", "bf16", False), (12, "mean", "bf16", False)] and encoder.training
    train_f = extract(encoder, prep.train_x[:24], [0.5], [0.25], "mean", "bf16")
    val_f = extract(encoder, prep.val_x[:12], [0.5], [0.25], "mean", "bf16")
    scores = probes.knn_scores(train_f, prep.train_y[:24], val_f, 5, 0.1, 4)
    assert top1 == (scores.argmax(1) == prep.val_y[:12]).float().mean().item()
