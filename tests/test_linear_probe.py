"""The linear probe's parts by their contracts: MAE's BN head (BatchNorm1d without affine parameters, eps 1e-6,
then the Linear) by default and the plain Linear for head="plain"; the Linear's trunc-normal(0.01) init; the batch
order drawn from the probe's own seeded generator (the global RNG does not matter); the cosine lr over exactly
epochs * ceil(N / batch_size) steps, ending at 0; every training sample used once per epoch. Also the encoder's
embedding of the cls token (cls_token + its position), against timm's own path."""
import math

import pytest
import torch
from torch import nn

from pipeline.evaluation import probes
from pipeline.models.encoder import build_encoder

REAL_OPTIMIZER, REAL_EVALUATE = probes.probe_optimizer, probes._evaluate


def data(n=10, dim=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


def run(monkeypatch, n=10, batch_size=4, epochs=2, seed=0, **kw):
    """linear_probe on tiny random features; returns (metrics, history, record): the model it evaluates, its
    Linear with the initial weights, its optimiser, and the rows the Linear saw in training, per forward."""
    record = {"batches": [], "model": None}

    def probe_optimizer(name, linear, *a):
        record["init_weight"], record["init_bias"] = linear.weight.detach().clone(), linear.bias.detach().clone()
        record["linear"] = linear
        linear.register_forward_pre_hook(lambda m, inp: record["batches"].append(inp[0].detach().clone())
                                         if m.training else None)
        record["opt"] = REAL_OPTIMIZER(name, linear, *a)
        return record["opt"]

    def evaluate(head, val_f, val_y):
        record["model"] = head
        return REAL_EVALUATE(head, val_f, val_y)

    monkeypatch.setattr(probes, "probe_optimizer", probe_optimizer)
    monkeypatch.setattr(probes, "_evaluate", evaluate)
    train_f, train_y = data(n)
    val_f, val_y = data(6, seed=1)
    kw = dict(dict(lr=0.1, momentum=0.9, weight_decay=0.0), **kw)
    metrics, history = probes.linear_probe(train_f, train_y, val_f, val_y, 3, epochs=epochs, batch_size=batch_size,
                                           seed=seed, **kw)
    return metrics, history, record


def test_the_default_head_is_mae_batchnorm_without_affine_then_linear(monkeypatch):
    """MAE's head: BatchNorm1d(affine=False, eps=1e-6) before the Linear, the default and for head="bn"."""
    for kw in ({}, {"head": "bn"}):
        _, _, rec = run(monkeypatch, **kw)
        model = rec["model"]
        assert isinstance(model, nn.Sequential) and len(model) == 2 and model[1] is rec["linear"]
        bn = model[0]
        assert type(bn) is nn.BatchNorm1d and bn.num_features == 6 and bn.eps == 1e-6
        assert bn.weight is None and bn.bias is None and not list(bn.parameters())


def test_the_plain_head_is_the_linear_alone(monkeypatch):
    _, _, rec = run(monkeypatch, head="plain")
    assert rec["model"] is rec["linear"]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in rec["model"].modules())


def test_the_linear_starts_trunc_normal_001_and_zero_bias(monkeypatch):
    _, _, rec = run(monkeypatch, n=64, batch_size=64, epochs=1)
    w = rec["init_weight"]
    assert 0.005 < w.std().item() < 0.02 and w.abs().max().item() < 0.05
    assert torch.equal(rec["init_bias"], torch.zeros(3))


def test_the_batch_order_is_the_seeds_not_the_global_rngs(monkeypatch):
    """Same seed: the same batches (and probe) whatever the global RNG's state; another seed: another order."""
    torch.manual_seed(1)
    m1, h1, r1 = run(monkeypatch)
    torch.manual_seed(2)
    m2, h2, r2 = run(monkeypatch)
    assert m1 == m2 and h1 == h2
    assert all(torch.equal(a, b) for a, b in zip(r1["batches"], r2["batches"], strict=True))
    torch.manual_seed(1)
    _, _, r3 = run(monkeypatch, seed=5)
    assert not all(torch.equal(a, b) for a, b in zip(r1["batches"], r3["batches"], strict=True))


@pytest.mark.parametrize("n,batch_size,epochs", [(10, 4, 2), (8, 4, 3), (5, 8, 2)])
def test_cosine_lr_spans_epochs_times_ceil_n_over_bs_steps(monkeypatch, n, batch_size, epochs):
    """The schedule's length is the number of optimiser steps: the lr reaches 0 exactly at the last one."""
    steps = epochs * math.ceil(n / batch_size)
    _, _, rec = run(monkeypatch, n=n, batch_size=batch_size, epochs=epochs, head="plain")
    assert len(rec["batches"]) == steps
    for group in rec["opt"].param_groups:
        assert group["lr"] == pytest.approx(0.0, abs=1e-12) and group["initial_lr"] == 0.1


def test_every_training_sample_is_used_once_per_epoch(monkeypatch):
    """head="plain": the Linear sees the features themselves; per epoch, batches of 4, 4, 2 covering all 10 rows."""
    _, history, rec = run(monkeypatch, n=10, batch_size=4, epochs=2, head="plain")
    train_f, _ = data(10)
    assert [len(b) for b in rec["batches"]] == [4, 4, 2, 4, 4, 2]
    for epoch in (rec["batches"][:3], rec["batches"][3:]):
        rows = torch.cat(epoch)
        assert torch.equal(rows[torch.argsort(rows[:, 0])], train_f[torch.argsort(train_f[:, 0])])
    assert len(history) == 2


def test_embed_cls_is_cls_token_plus_its_position():
    """The cls token entering the first block is cls_token + pos_embed[:, :1] (as timm's _pos_embed), also when
    the cls position is not zero (imported or learned positions)."""
    enc = build_encoder(dict(arch="vit_tiny_patch16_224", patch_size=2, embed_dim=16, depth=1, num_heads=2), 4, 1,
                        seed=0)
    with torch.no_grad():
        enc.vit.pos_embed.normal_(generator=torch.Generator().manual_seed(0))
        enc.vit.cls_token.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = enc.embed(x)
        expected = enc.vit._pos_embed(enc.vit.patch_embed(x))
    assert torch.allclose(out[:, 0], (enc.vit.cls_token[0, 0] + enc.vit.pos_embed[0, 0]).expand(2, -1))
    assert torch.allclose(out, expected, atol=1e-6)
