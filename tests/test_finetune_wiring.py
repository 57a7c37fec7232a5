"""finetune()'s wiring (pipeline/evaluation/finetune.py): that the training loop really uses the parts its docstring
names, each with the run's own settings. Fine-tuning trains on RandAugment-ed images (the transform built from
finetune.randaug for the images' size, filling with the train mean as 8-bit pixel values); with Mixup/CutMix every
training batch is mixed and the loss is timm's SoftTargetCrossEntropy on the soft targets; the run trains,
evaluates and resolves its precision on its device (hardware.device() when none is given), with the model's
attention kernels in the autocast, and sums the epoch's loss there; fp16 gradients are unscaled before clipping;
the progress bar counts the run's images to a total, so it shows a percentage and an ETA. The collaborators are
wrapped to observe what finetune passes them."""
import random

import numpy as np
import pytest
import torch
from test_finetune_parts import SETTINGS, encoder, prep

from pipeline import hardware
from pipeline.evaluation import finetune
from pipeline.settings import Finetune

pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py: torch on one thread

RANDAUG = "rand-m9-mstd0.5-inc1"


def train(device="cpu", n=16, **over):
    """finetune() of a tiny model on n 8x8 grey images, batch 8 (2 steps an epoch), 1 epoch unless given."""
    p = prep(n=n)
    model = finetune.from_encoder(encoder(), 3, 0.0, 0)
    settings = Finetune.of(dict(SETTINGS, **dict(dict(epochs=1), **over)))
    metrics, history = finetune.finetune(model, p, settings, seed=1, device=device)
    return model, p, settings, history


def test_finetune_trains_on_randaugmented_images(monkeypatch):
    built, augmented, batches = [], [], []
    real_build, real_aug, real_batch = finetune.randaug_transform, finetune.randaugment, finetune.train_batch

    def randaug_transform(config, img_size, mean):
        built.append(((config, img_size, mean), real_build(config, img_size, mean)))
        return built[-1][1]

    def randaugment(images, transform):
        augmented.append(transform)
        return real_aug(images, transform)

    def train_batch(images, labels, p, transform, mixup, device):
        batches.append(transform)
        return real_batch(images, labels, p, transform, mixup, device)

    monkeypatch.setattr(finetune, "randaug_transform", randaug_transform)
    monkeypatch.setattr(finetune, "randaugment", randaugment)
    monkeypatch.setattr(finetune, "train_batch", train_batch)
    _, p, _, _ = train(randaug=RANDAUG)
    (args, transform), = built
    assert args == (RANDAUG, 8, p.mean)                # finetune.randaug, for the images' width, with the train mean
    assert transform is not None and transform.ops[0].hparams["translate_const"] == int(8 * 0.45)
    assert batches == [transform, transform]            # every training step's batch goes through it
    assert augmented == [transform, transform]


def test_mixup_mixes_every_training_batch_and_the_loss_is_soft_target_cross_entropy(monkeypatch):
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    mixed, losses = [], []
    real_mix, real_loss = Mixup.__call__, SoftTargetCrossEntropy.forward

    def mix(self, x, y):
        out = real_mix(self, x, y)
        mixed.append((self.mixup_alpha, self.cutmix_alpha, out[1]))
        return out

    def loss(self, logits, target):
        losses.append(target)
        return real_loss(self, logits, target)

    monkeypatch.setattr(Mixup, "__call__", mix)
    monkeypatch.setattr(SoftTargetCrossEntropy, "forward", loss)
    _, _, _, history = train(mixup=0.8, cutmix=1.0)
    assert [(a, c) for a, c, _ in mixed] == [(0.8, 1.0)] * 2 and len(losses) == 2
    for (_, _, soft), target in zip(mixed, losses):
        assert target is soft and target.shape == (8, 3)       # the loss sees Mixup's soft targets
        assert torch.allclose(target.sum(1), torch.ones(8)) and (target < 1).all()
    assert history[0]["train_loss"] > 0


def test_progress_bar_counts_the_runs_images_to_a_total_so_it_shows_an_eta(monkeypatch):
    bars = []

    class Bar(finetune.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(finetune, "tqdm", Bar)
    train(epochs=2, n=20)                                # 2 steps of 8 an epoch (4 images left over)
    bar, = bars
    assert bar.total == 2 * 2 * 8 and bar.n == bar.total   # it ends at 100%, not past an unknown total
    meter = bar.format_meter(**dict(bar.format_dict, n=8, elapsed=1.0))
    assert "25%" in meter and "<00:03" in meter            # a quarter done in 1 s: 3 s to go


def test_without_a_device_it_runs_on_hardwares_device_and_resolves_its_precision_there(monkeypatch):
    asked, resolved = [], []
    real_resolve = hardware.resolve
    monkeypatch.setattr(hardware, "device", lambda *a: (asked.append(a), "cpu")[1])
    monkeypatch.setattr(hardware, "resolve", lambda *a: (resolved.append(a), real_resolve(*a))[1])
    model, *_ = train(device=None)
    assert asked == [()] and next(model.parameters()).device.type == "cpu"
    assert resolved[0] == ("fp32", "cpu")                   # the training's precision, for the training device
    asked.clear()
    train(device="cpu")
    assert asked == []                                      # a device given is used as given


def test_a_bf16_run_trains_and_evaluates_in_bf16_with_the_models_attention_kernels(monkeypatch):
    casts, evals = [], []
    real_cast, real_extract = hardware.Precision.autocast, finetune.extract_features

    def autocast(self, module=None):
        casts.append((self.name, module))
        return real_cast(self, module)

    def extract_features(model, images, mean, std, kind, precision="fp32", **kwargs):
        evals.append(precision)
        return real_extract(model, images, mean, std, kind, precision, **kwargs)

    monkeypatch.setattr(hardware.Precision, "autocast", autocast)
    monkeypatch.setattr(finetune, "extract_features", extract_features)
    model, *_ = train(precision="bf16", epochs=2)
    assert evals == ["bf16", "bf16"]                        # each epoch's val metrics in the run's precision
    assert len(casts) == 2 * 2 + 2 and set(casts) == {("bf16", model)}   # 4 training steps, 2 evaluations


def test_evaluate_computes_in_the_precision_given(monkeypatch):
    seen = []
    real = finetune.extract_features
    monkeypatch.setattr(finetune, "extract_features",
                        lambda *a, **k: (seen.append(a[5] if len(a) > 5 else k.get("precision")), real(*a, **k))[1])
    p = prep()
    model = finetune.from_encoder(encoder(), 3, 0.0, 0)
    metrics = finetune.evaluate(model, p.val_x, p.val_y, p.mean, p.std, "bf16")
    assert seen == ["bf16"] and "top1" in metrics


def test_the_epochs_loss_is_summed_on_the_training_device(monkeypatch):
    made = []

    class Torch:                                # finetune's torch, recording where it makes its zeros
        def __getattr__(self, name):
            return getattr(torch, name)

        def zeros(self, *args, **kwargs):
            made.append(kwargs.get("device", "torch's default device"))
            return torch.zeros(*args, **kwargs)

    monkeypatch.setattr(finetune, "torch", Torch())
    train(device="cpu", epochs=2)
    assert made == ["cpu", "cpu"]               # one accumulator an epoch, on the device the loss is on


def test_fp16_gradients_are_unscaled_before_clipping(monkeypatch):
    norms = []
    real = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *args, **kwargs):
        params = list(params)
        norms.append(torch.linalg.vector_norm(torch.stack([q.grad.float().norm() for q in params])).item())
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    train(precision="fp16", clip_grad=1.0)
    assert len(norms) == 2
    finite = [v for v in norms if v == v and v != float("inf")]   # a step that overflowed is skipped by the scaler
    assert finite and all(v < 1e3 for v in finite)       # true gradients, not ones times the 2^16 loss scale


def test_randaugment_fills_with_the_train_mean_as_8_bit_pixel_values():
    rgb = finetune.randaug_transform(RANDAUG, 8, [0.8, 0.3, 0.02])
    assert {op.hparams["img_mean"] for op in rgb.ops} == {(204, 76, 5)}          # 255 * mean, rounded
    grey = finetune.randaug_transform(RANDAUG, 8, [0.8])
    assert {op.kwargs["fillcolor"] for op in grey.ops} == {(204, 204, 204)}


def test_seed_step_takes_any_seed_and_step():
    """seed_step seeds numpy too, whose seeds stop below 2**32: the step's stream key is folded into that range, for
    seeds whose key passes it (seed 4295: 4,295,012,885) as for small ones; the same (seed, step), the same draws."""
    for seed, step in ((0, 0), (4295, 0), (4295, 7), (10**6, 123)):
        finetune.seed_step(seed, step)
        first = (random.random(), np.random.rand(), torch.rand(1).item())
        finetune.seed_step(seed, step)
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
