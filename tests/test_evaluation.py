"""k-NN and linear probe on features with a known answer."""
import pytest
import torch

from pipeline.evaluation import knn_scores, linear_probe, topk_accuracy


def clusters(n_per, classes=4, dim=8, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per)
    return centres[y] + noise * torch.randn(len(y), dim, generator=g), y


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(scores, torch.tensor([1, 1, 0]), ks=(1, 2))
    assert acc["top1"] == pytest.approx(1 / 3) and acc["top2"] == pytest.approx(2 / 3)


def test_knn_separable_clusters_and_vote_weighting():
    train_f, train_y = clusters(20)
    val_f = train_f[::4] + 0.01
    val_y = train_y[::4]
    assert topk_accuracy(knn_scores(train_f, train_y, val_f, 20, 0.07, 4), val_y)["top1"] == 1.0
    # one very close neighbour of class 1 outvotes 2 far ones of class 0 at low temperature
    tf = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    scores = knn_scores(tf, torch.tensor([1, 0, 0]), torch.tensor([[1.0, 0.05]]), 3, 0.07, 2)
    assert scores.argmax().item() == 1


def test_linear_probe_learns_and_is_deterministic():
    train_f, train_y = clusters(30, noise=0.5)
    val_f, val_y = clusters(10, noise=0.5, seed=0)
    metrics, history = linear_probe(train_f, train_y, val_f, val_y, 4, epochs=5, batch_size=32, lr=0.1,
                                    momentum=0.9, weight_decay=0.0, seed=0)
    again, _ = linear_probe(train_f, train_y, val_f, val_y, 4, epochs=5, batch_size=32, lr=0.1,
                            momentum=0.9, weight_decay=0.0, seed=0)
    assert metrics["top1"] > 0.9 and metrics == again
    assert len(history) == 5 and history[-1]["train_loss"] < history[0]["train_loss"]


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("lars", 6.4), ("adamw", 0.01)])
@pytest.mark.parametrize("head", ["bn", "plain"])
def test_linear_probe_options_learn(optimizer, lr, head):
    """LARS moves the weights by ~lr * 0.001 of their norm per step: it needs more steps (MAE: lr 6.4)."""
    train_f, train_y = clusters(30, noise=0.5)
    val_f, val_y = clusters(10, noise=0.5, seed=0)
    metrics, history = linear_probe(train_f, train_y, val_f, val_y, 4, epochs=30, batch_size=8, lr=lr,
                                    momentum=0.9, weight_decay=0.0, seed=0, head=head, optimizer=optimizer)
    assert metrics["top1"] > 0.9, (optimizer, head, history)


def test_lars_scales_the_weight_step_by_the_trust_ratio():
    """timm's LARS as MAE uses it: the weight matrix's step is lr * 0.001 * |w| / |g| (times the gradient),
    the bias takes a plain SGD step."""
    from torch import nn

    from pipeline.evaluation import probe_optimizer

    linear = nn.Linear(4, 2)
    w0, b0 = linear.weight.detach().clone(), linear.bias.detach().clone()
    linear.weight.grad, linear.bias.grad = torch.full_like(w0, 0.5), torch.full_like(b0, 0.5)
    probe_optimizer("lars", linear, lr=1.0, momentum=0.0, weight_decay=0.0).step()
    ratio = 0.001 * w0.norm() / linear.weight.grad.norm()
    assert torch.allclose(w0 - linear.weight.detach(), ratio * 0.5 * torch.ones_like(w0), atol=1e-7)
    assert torch.allclose(b0 - linear.bias.detach(), torch.full_like(b0, 0.5))
