"""k-NN and linear probe on features with a known answer."""
import pytest
import torch

from pipeline.evaluation.probes import knn_scores, linear_probe, topk_accuracy


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

    from pipeline.evaluation.probes import probe_optimizer

    linear = nn.Linear(4, 2)
    w0, b0 = linear.weight.detach().clone(), linear.bias.detach().clone()
    linear.weight.grad, linear.bias.grad = torch.full_like(w0, 0.5), torch.full_like(b0, 0.5)
    probe_optimizer("lars", linear, lr=1.0, momentum=0.0, weight_decay=0.0).step()
    ratio = 0.001 * w0.norm() / linear.weight.grad.norm()
    assert torch.allclose(w0 - linear.weight.detach(), ratio * 0.5 * torch.ones_like(w0), atol=1e-7)
    assert torch.allclose(b0 - linear.bias.detach(), torch.full_like(b0, 0.5))


def test_pixel_features_are_the_normalised_images_flattened():
    from pipeline.evaluation.probes import pixel_features

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 2, 3, 4), dtype=torch.uint8, generator=g)
    mean, std = [0.25, 0.5], [0.5, 0.25]
    f = pixel_features(images, mean, std, batch_size=2)                  # batches of 2, 2, 1
    assert f.shape == (5, 2 * 3 * 4) and f.dtype == torch.float32
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 2, 1, 1)) / torch.tensor(std).view(1, 2, 1, 1)
    assert torch.allclose(f, expected.flatten(1))
    assert pixel_features(images[:0], mean, std).shape == (0, 24)


def test_knn_on_pixels_of_trivially_separable_images_is_perfect():
    """Class c lights up quadrant c of an 8x8 grey image (plus noise): k-NN on the normalised pixels is 100%."""
    from pipeline.evaluation.probes import pixel_features

    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(15)
    images = torch.randint(0, 40, (len(y), 1, 8, 8), dtype=torch.uint8, generator=g)
    for i, c in enumerate(y.tolist()):
        images[i, 0, 4 * (c // 2):4 * (c // 2) + 4, 4 * (c % 2):4 * (c % 2) + 4] += 200
    f = pixel_features(images, [0.3], [0.3])
    train, val = slice(0, 40), slice(40, None)
    scores = knn_scores(f[train], y[train], f[val], 20, 0.07, 4)
    assert topk_accuracy(scores, y[val])["top1"] == 1.0


def test_pixels_node_runs_knn_and_linprobe_on_the_prepared_images(workdir):
    """knn@seed0-pixels and linprobe@seed0-pixels: the same protocol and settings as the encoders' nodes on the
    normalised pixels; metrics.json records the dataset as the 'weights'; each is a tracked MLflow run."""
    from mlflow.tracking import MlflowClient

    from pipeline import config, layout
    from pipeline.checkpoint import read_json
    from pipeline.data import datasets
    from pipeline.evaluation.probes import pixel_features
    from pipeline.stages.evaluation import knn, linprobe
    from pipeline.stages.training import prepare_data

    tiny = ["--preset", "tiny"]
    prepare_data.main(tiny)
    knn.main(tiny + ["--weights", "pixels"])
    linprobe.main(tiny + ["--weights", "pixels"])
    params, prep = config.load("tiny"), datasets.load_prepared()
    doc = read_json(layout.eval_metrics("knn", "pixels", 0))
    assert doc["settings"] == params["knn"] and doc["precision"] == "fp32"
    assert doc["weights"] == {"id": "pixels", "method": "pixels", "stage": None, "seed": 0, "evaluated": "pixels",
                              "depth": 0, "path": str(layout.DATASET),
                              "sha256": read_json(layout.sidecar(layout.DATASET))["sha256"]}
    s = params["knn"]
    f_train, f_val = (pixel_features(x, prep.mean, prep.std) for x in (prep.train_x, prep.val_x))
    assert f_train.shape == (len(prep.train_x), prep.train_x[0].numel())
    top1 = topk_accuracy(knn_scores(f_train, prep.train_y, f_val, s["k"], s["temperature"], len(prep.class_names)),
                         prep.val_y)["top1"]
    assert doc["metrics"]["top1"] == pytest.approx(top1) and top1 > 0.8          # 8x8 digits: pixels do well
    lin = read_json(layout.eval_metrics("linprobe", "pixels", 0))
    assert lin["settings"] == params["linprobe"] and len(lin["history"]) == params["linprobe"]["epochs"]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    names = {r.info.run_name: r for r in runs}
    assert {"knn@seed0-pixels", "linprobe@seed0-pixels"} <= set(names)
    assert names["knn@seed0-pixels"].data.metrics["top1"] == pytest.approx(top1)
    parent = next(r for r in runs if r.data.tags.get("role") == "chain" and r.data.tags.get("chain") == "pixels")
    assert names["knn@seed0-pixels"].data.tags["mlflow.parentRunId"] == parent.info.run_id
