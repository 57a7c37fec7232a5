"""The probes' parts (pipeline/evaluation/probes.py) by their contracts: features computed in eval mode and in
float32 whatever the encoder's output dtype, per batch; top-k accuracy for every k up to the number of classes; the
k-NN vote with k capped at the training set and exp(sim / T) weights; the probe optimisers' groups (weight decay on
the weight matrix only, SGD's momentum, AdamW's lr, LARS's trust-ratio flags) and the unknown-name error; the
linear probe's history (the epoch's per-sample mean loss, val top-1 after each epoch)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.evaluation import probes


class Recorder(nn.Module):
    """An 'encoder' whose features are the per-image pixel mean and the batch length, in bf16."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.calls = []

    def features(self, x, kind):
        self.calls.append((len(x), kind, self.training))
        return torch.stack([x.flatten(1).mean(1) * self.w, torch.full((len(x),), float(len(x)))], 1).bfloat16()


def test_extract_features_batches_in_eval_mode_and_returns_float32():
    enc = Recorder().train()
    images = torch.randint(0, 256, (5, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    f = probes.extract_features(enc, images, [0.5], [0.25], "cls", batch_size=2, progress=False)
    assert not enc.training and enc.calls == [(2, "cls", False), (2, "cls", False), (1, "cls", False)]
    assert f.dtype == torch.float32 and f.shape == (5, 2)
    normed = (images.float() / 255 - 0.5) / 0.25
    assert torch.allclose(f[:, 0], normed.flatten(1).mean(1).bfloat16().float())
    assert f[:, 1].tolist() == [2, 2, 2, 2, 1]
    assert probes.extract_features(enc, images, [0.5], [0.25], "mean").shape == (5, 2)
    assert enc.calls[-1] == (5, "mean", False)                                   # the default batch is 512


def test_extract_features_shows_its_progress_under_its_name(capsys):
    enc = Recorder()
    images = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    probes.extract_features(enc, images, [0.5], [0.25], "cls", batch_size=1, desc="knn train")
    err = capsys.readouterr().err
    assert "knn train" in err and "3/3" in err and "batch" in err
    probes.extract_features(enc, images, [0.5], [0.25], "cls", progress=False)
    assert capsys.readouterr().err == ""
    probes.extract_features(enc, images, [0.5], [0.25], "cls")
    assert "features" in capsys.readouterr().err


def test_topk_accuracy_for_every_k_up_to_the_classes():
    scores = torch.tensor([[5.0, 4, 3, 2, 1], [1.0, 2, 3, 4, 5], [0.0, 9, 1, 2, 3]])
    labels = torch.tensor([4, 4, 0])
    assert probes.topk_accuracy(scores, labels) == {"top1": pytest.approx(1 / 3), "top5": 1.0}
    assert probes.topk_accuracy(scores[:, :4], torch.tensor([3, 3, 0])) == {"top1": pytest.approx(1 / 3)}
    assert probes.topk_accuracy(scores, labels, ks=(2, 3)) == {"top2": pytest.approx(1 / 3),
                                                                "top3": pytest.approx(1 / 3)}


def test_knn_caps_k_at_the_training_set_and_weights_by_temperature():
    train_f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    train_y = torch.tensor([0, 1, 1])
    val_f = torch.tensor([[2.0, 1.0]])
    sim = F.normalize(val_f, dim=1) @ F.normalize(train_f, dim=1).T
    scores = probes.knn_scores(train_f, train_y, val_f, k=10, temperature=0.5, num_classes=3)
    w = (sim[0] / 0.5).exp()
    assert torch.allclose(scores, torch.tensor([[w[0], w[1] + w[2], 0.0]]))
    two = probes.knn_scores(train_f, train_y, val_f, k=2, temperature=0.5, num_classes=2)
    top = sim[0].topk(2)
    expected = torch.zeros(2)
    for s, j in zip(top.values, top.indices):
        expected[train_y[j]] += (s / 0.5).exp()
    assert torch.allclose(two[0], expected)
    val = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    chunked = probes.knn_scores(train_f, train_y, val, k=2, temperature=1.0, num_classes=2, chunk=2)
    assert torch.allclose(chunked, probes.knn_scores(train_f, train_y, val, 2, 1.0, 2))


def test_probe_optimizers_decay_the_weight_matrix_only():
    linear = nn.Linear(3, 2)
    sgd = probes.probe_optimizer("sgd", linear, lr=0.5, momentum=0.8, weight_decay=0.1)
    assert type(sgd) is torch.optim.SGD
    (w, b) = sgd.param_groups
    assert w["params"] == [linear.weight] and w["weight_decay"] == 0.1 and w["lr"] == 0.5 and w["momentum"] == 0.8
    assert b["params"] == [linear.bias] and b["weight_decay"] == 0.0
    adamw = probes.probe_optimizer("adamw", linear, lr=0.01, momentum=0.8, weight_decay=0.2)
    assert type(adamw) is torch.optim.AdamW
    (w, b) = adamw.param_groups
    assert w["params"] == [linear.weight] and w["weight_decay"] == 0.2 and w["lr"] == 0.01
    assert b["params"] == [linear.bias] and b["weight_decay"] == 0.0
    lars = probes.probe_optimizer("lars", linear, lr=2.0, momentum=0.7, weight_decay=0.3)
    (w, b) = lars.param_groups
    assert w["params"] == [linear.weight] and w["weight_decay"] == 0.3 and w["always_adapt"] is True
    assert b["params"] == [linear.bias] and b["weight_decay"] == 0.0 and b["always_adapt"] is False
    assert w["lr"] == 2.0 and w["momentum"] == 0.7
    with pytest.raises(ValueError, match=r"^unknown probe optimizer 'adam' \(sgd, lars, adamw\)$"):
        probes.probe_optimizer("adam", linear, 0.1, 0.9, 0.0)


def test_sgd_probe_step_applies_weight_decay_to_the_weight_only():
    linear = nn.Linear(2, 1)
    with torch.no_grad():
        linear.weight.fill_(1.0)
        linear.bias.fill_(1.0)
    linear.weight.grad, linear.bias.grad = torch.zeros(1, 2), torch.zeros(1)
    probes.probe_optimizer("sgd", linear, lr=0.5, momentum=0.0, weight_decay=0.1).step()
    assert torch.allclose(linear.weight, torch.full((1, 2), 1 - 0.5 * 0.1)) and linear.bias.item() == 1.0


def test_linear_probe_history_is_the_per_sample_mean_loss_and_val_top1(monkeypatch):
    g = torch.Generator().manual_seed(0)
    train_f, train_y = torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    val_f, val_y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    losses, evals = [], []
    real_ce, real_eval = F.cross_entropy, probes._evaluate

    def ce(logits, y):
        loss = real_ce(logits, y)
        losses.append((loss.item(), len(y)))
        return loss

    def evaluate(head, f, y):
        out = real_eval(head, f, y)
        evals.append(out)
        return out

    monkeypatch.setattr(probes.F, "cross_entropy", ce)
    monkeypatch.setattr(probes, "_evaluate", evaluate)
    metrics, history = probes.linear_probe(train_f, train_y, val_f, val_y, 3, epochs=2, batch_size=4, lr=0.1,
                                           momentum=0.9, weight_decay=0.0, seed=0, head="plain")
    assert [n for _, n in losses] == [4, 4, 2, 4, 4, 2]
    for e in range(2):
        part = losses[3 * e:3 * e + 3]
        assert history[e]["train_loss"] == pytest.approx(sum(v * n for v, n in part) / 10, rel=1e-6)
        assert history[e]["val_top1"] == evals[e]["top1"] and history[e]["epoch"] == e
    assert metrics == evals[-1] and len(evals) == 3
    assert math.isfinite(history[0]["train_loss"])
