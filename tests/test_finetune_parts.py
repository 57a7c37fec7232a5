"""Fine-tuning's parts (pipeline/evaluation/finetune.py) by the module's documented contracts: the model (timm ViT
with avg pooling, fc_norm, linear drop path, the head seeded trunc-normal 2e-5 without touching the global RNG), the
saved model's sidecar and its errors, the optimiser (fused AdamW), lr = blr * batch / 256, RandAugment's hparams
(fill of the train mean, 45% translations, bicubic, posterize of 0 bits black), grey images augmented as RGB, Mixup's
settings, label-smoothed CE, every global RNG seeded per step from (seed, step) and restored afterwards; and the
training loop: the step batches, per-step lr times each group's lr_scale, clip_grad, the epoch's mean loss, the
val evaluation, the history's lr, the non-finite loss error; the curve figure's content."""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import datasets
from pipeline.errors import PipelineError
from pipeline.evaluation import finetune
from pipeline.models.encoder import build_encoder
from pipeline.settings import Finetune
from pipeline.train import engine

MODEL = dict(arch="vit_tiny_patch16_224", patch_size=2, embed_dim=16, depth=2, num_heads=2)
SETTINGS = dict(epochs=2, batch_size=8, blr=0.02, layer_decay=0.5, weight_decay=0.05, label_smoothing=0.1,
                warmup_epochs=1, min_lr=1e-4, clip_grad=None, mixup=0.0, cutmix=0.0, randaug=None,
                precision="fp32")


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py: torch on one thread


def prep(n=24, channels=1, size=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % classes
    return datasets.Prepared(x, y, x[:6].clone(), y[:6].clone(), [str(c) for c in range(classes)],
                             [0.4] * channels, [0.2] * channels, "synthetic")


def encoder(seed=0):
    return build_encoder(MODEL, 8, 1, seed=seed)


# ---- the model -----------------------------------------------------------------------------------------

def test_classifier_is_timms_vit_with_avg_pool_fc_norm_and_linear_drop_path():
    config = dict(encoder().config)
    model = finetune.Classifier(config, 5, drop_path=0.3)
    vit = model.vit
    assert model.num_classes == 5 and model.config == config and model.config is not config
    assert vit.global_pool == "avg" and isinstance(vit.fc_norm, torch.nn.LayerNorm)
    assert isinstance(vit.norm, torch.nn.Identity) and vit.head.out_features == 5
    assert vit.patch_embed.proj.in_channels == 1 and vit.patch_embed.proj.kernel_size == (2, 2)
    assert vit.embed_dim == 16 and len(vit.blocks) == 2 and vit.blocks[0].attn.num_heads == 2
    assert isinstance(vit.blocks[0].drop_path1, torch.nn.Identity)                 # linear in depth: 0 then 0.3
    assert vit.blocks[1].drop_path1.drop_prob == pytest.approx(0.3)
    assert not vit.pos_embed.requires_grad and vit.cls_token.requires_grad
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in finetune.Classifier(config, 5).vit.blocks)
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    assert torch.equal(model.features(x), model(x)) and torch.equal(model.features(x, "logits"), vit(x))
    pooled = model.features(x, "pooled")
    assert torch.allclose(pooled, vit.fc_norm(vit.forward_features(x)[:, 1:].mean(1)), atol=1e-6)


def test_head_is_seeded_trunc_normal_2e_5_and_the_global_rng_is_untouched():
    enc = encoder()
    torch.manual_seed(11)
    state = torch.get_rng_state()
    model = finetune.from_encoder(enc, 4, drop_path=0.0, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(3)
    ref = finetune.Classifier(enc.config, 4)
    torch.nn.init.trunc_normal_(ref.vit.head.weight, std=2e-5)
    assert torch.equal(model.vit.head.weight, ref.vit.head.weight) and finetune.HEAD_STD == 2e-5
    assert torch.equal(model.vit.head.bias, torch.zeros(4))
    assert 5e-6 < model.vit.head.weight.std() < 4e-5
    assert torch.equal(model.vit.fc_norm.weight, torch.ones(16))
    assert torch.equal(model.vit.fc_norm.bias, torch.zeros(16))
    other = finetune.from_encoder(enc, 4, drop_path=0.0, seed=4)
    assert not torch.equal(other.vit.head.weight, model.vit.head.weight)
    assert torch.equal(model.vit.blocks[1].mlp.fc2.weight, enc.vit.blocks[1].mlp.fc2.weight)
    assert model.vit.blocks[1].drop_path1.__class__ is torch.nn.Identity
    assert finetune.from_encoder(enc, 4, drop_path=0.2, seed=3).vit.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)


def test_an_encoder_that_does_not_fit_is_refused():
    enc = encoder()
    enc.vit.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(PipelineError, match=r"^the encoder does not fit the fine-tuning ViT: missing "
                                            r"\[.*'head\.bias'\], unexpected \['extra'\]$"):
        finetune.from_encoder(enc, 4, 0.0, 0)
    enc = encoder()
    del enc.vit.cls_token
    enc.vit.cls_token = None
    with pytest.raises(PipelineError, match=r"missing \[.*'cls_token'.*\], unexpected \[\]$"):
        finetune.from_encoder(enc, 4, 0.0, 0)


def test_saved_model_sidecar_and_reload(tmp_path):
    model = finetune.from_encoder(encoder(), 4, 0.1, 0)
    path = tmp_path / "m.safetensors"
    side = finetune.save_model(path, model, {"node": "finetune", "num_classes": 99})
    assert side["model"] == model.config and side["num_classes"] == 4 and side["node"] == "finetune"
    assert side["head"] == {"global_pool": "avg", "fc_norm": True}
    loaded, meta = finetune.load_model(path)
    assert not loaded.training and meta["num_classes"] == 4 and loaded.num_classes == 4
    assert all(torch.equal(v, model.vit.state_dict()[k]) for k, v in loaded.vit.state_dict().items())


def test_load_model_errors_name_the_problem(tmp_path):
    from pipeline.checkpoint import save_tensors

    model = finetune.from_encoder(encoder(), 4, 0.0, 0)
    path = tmp_path / "no_config.safetensors"
    save_tensors(path, model.vit.state_dict(), {"num_classes": 4})
    with pytest.raises(PipelineError, match=rf"^{path} has no fine-tuned model config in its sidecar; rerun finetune$"):
        finetune.load_model(path)
    save_tensors(path, model.vit.state_dict(), {"model": model.config})
    with pytest.raises(PipelineError, match="has no fine-tuned model config"):
        finetune.load_model(path)
    other = tmp_path / "other.safetensors"
    save_tensors(other, model.vit.state_dict(), {"model": model.config, "num_classes": 5})
    with pytest.raises(PipelineError, match=rf"^{other} does not fit the model its sidecar describes: "):
        finetune.load_model(other)


# ---- optimiser, lr, augmentation -----------------------------------------------------------------------

def test_optimizer_is_fused_adamw_with_the_lr_and_weight_decay():
    model = finetune.from_encoder(encoder(), 4, 0.0, 0)
    opt = finetune.optimizer(model, lr=0.01, weight_decay=0.2, layer_decay=0.5)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    assert {g["lr"] for g in opt.param_groups} == {0.01}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.2}
    assert sorted({g["lr_scale"] for g in opt.param_groups}) == pytest.approx([0.125, 0.25, 0.5, 1.0])


def test_peak_lr_is_blr_times_batch_over_256():
    assert finetune.peak_lr(Finetune.of(SETTINGS), 64) == pytest.approx(0.02 * 64 / 256)
    assert finetune.peak_lr(Finetune.of(dict(SETTINGS, blr=1e-3)), 512) == pytest.approx(2e-3)


def test_randaugment_hparams_are_maes_with_the_train_mean_as_fill():
    grey = finetune.randaug_transform("rand-m9-mstd0.5-inc1", 40, [0.5])
    assert grey.num_layers == 2 and len(grey.ops) > 10
    for op in grey.ops:
        assert op.hparams["translate_const"] == 18 and op.hparams["img_mean"] == (128, 128, 128)
        assert op.kwargs == {"fillcolor": (128, 128, 128), "resample": Image.BICUBIC}
        assert op.magnitude == 9 and op.hparams["magnitude_std"] == 0.5
    assert all(op.aug_fn is finetune._posterize for op in grey.ops if op.name.startswith("Posterize"))
    assert any(op.name.startswith("Posterize") for op in grey.ops)
    assert all(op.aug_fn is not finetune._posterize for op in grey.ops if not op.name.startswith("Posterize"))
    rgb = finetune.randaug_transform("rand-m5-n3", 8, [0.1, 1.0, 0.999])
    assert rgb.num_layers == 3 and rgb.ops[0].hparams["img_mean"] == (26, 255, 255)
    assert rgb.ops[0].hparams["translate_const"] == 3
    assert finetune.randaug_transform("", 8, [0.5]) is None and finetune.randaug_transform(None, 8, [0.5]) is None


def test_posterize_keeps_bits_and_zero_bits_is_black():
    from timm.data.auto_augment import posterize

    im = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
    for bits in (1, 4, 8):
        assert np.array_equal(np.asarray(finetune._posterize(im, bits)), np.asarray(posterize(im, bits)))
    black = finetune._posterize(Image.new("L", (3, 2), 200), 0)
    assert black.mode == "L" and black.size == (3, 2) and black.getextrema() == (0, 0)


def test_randaugment_runs_each_image_through_the_transform_as_rgb():
    seen = []

    def transform(pil):
        seen.append((pil.mode, np.asarray(pil).copy()))
        return Image.fromarray(255 - np.asarray(pil))

    grey = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = finetune.randaugment(grey, transform)
    assert [m for m, _ in seen] == ["RGB", "RGB"]
    assert np.array_equal(seen[1][1], np.repeat(grey[1].permute(1, 2, 0).numpy(), 3, axis=2))
    assert out.dtype == torch.uint8 and torch.equal(out, 255 - grey)
    seen.clear()
    rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = finetune.randaugment(rgb, transform)
    assert np.array_equal(seen[0][1], rgb[0].permute(1, 2, 0).numpy()) and torch.equal(out, 255 - rgb)
    colour = finetune.randaugment(grey, lambda pil: Image.fromarray(np.asarray(pil) * np.array([1, 0, 0], np.uint8)))
    luma = (grey.float() * 0.299).round()
    assert (colour.float() - luma).abs().max() <= 1                     # back to grey as Pillow's luma


def test_mixup_settings_are_maes():
    mixup = finetune.mixup_fn(Finetune.of(dict(SETTINGS, mixup=0.8, cutmix=1.0, label_smoothing=0.2)), 7)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob) == (0.8, 1.0, 1.0, 0.5)
    assert mixup.mode == "batch" and mixup.label_smoothing == 0.2 and mixup.num_classes == 7
    only_cutmix = finetune.mixup_fn(Finetune.of(dict(SETTINGS, cutmix=1.0)), 3)
    assert only_cutmix is not None and only_cutmix.mixup_alpha == 0.0 and only_cutmix.cutmix_alpha == 1.0
    assert finetune.mixup_fn(Finetune.of(dict(SETTINGS, mixup=0.5)), 3).mixup_alpha == 0.5
    assert finetune.mixup_fn(Finetune.of(SETTINGS), 3) is None


def test_hard_targets_use_label_smoothed_cross_entropy():
    loss = finetune.loss_fn(Finetune.of(dict(SETTINGS, label_smoothing=0.2)), None)
    logits, y = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]), torch.tensor([0, 1])
    logp = logits.log_softmax(1)
    expected = -(0.8 * logp[torch.arange(2), y] + 0.2 * logp.mean(1)).mean()
    assert loss(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_restored_rng_restores_every_global_rng_even_after_an_error():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    with pytest.raises(RuntimeError):
        with finetune.restored_rng():
            random.random(), np.random.rand(), torch.rand(1)
            raise RuntimeError
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


@pytest.mark.parametrize("seed", [0, 5])
def test_seed_step_seeds_every_global_rng_from_the_seed_and_step(seed):
    finetune.seed_step(seed, 7)
    draws = random.random(), np.random.rand(), torch.rand(1).item()
    s = engine.stream_key(seed) * 1_000_003 + 7
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)
    assert draws == (random.random(), np.random.rand(), torch.rand(1).item())


def test_seed_step_reduces_a_large_seed_for_numpy():
    seed = 2 ** 33                                        # the stream's seed exceeds numpy's 32-bit range
    finetune.seed_step(seed, 1)
    s = engine.stream_key(seed) * 1_000_003 + 1
    a = np.random.rand()
    np.random.seed(s % 2 ** 32)
    assert a == np.random.rand()


def test_train_batch_augments_normalises_then_mixes():
    p = prep()
    images, labels = p.train_x[:4], p.train_y[:4]
    x, y = finetune.train_batch(images, labels, p, None, None, "cpu")
    assert torch.equal(x, datasets.normalize(images, p.mean, p.std)) and torch.equal(y, labels)
    flip = lambda pil: pil.transpose(Image.FLIP_LEFT_RIGHT)                            # noqa: E731
    x, _ = finetune.train_batch(images, labels, p, flip, None, "cpu")
    assert torch.equal(x, datasets.normalize(images.flip(-1), p.mean, p.std))
    mixed = finetune.train_batch(images, labels, p, None, lambda a, b: (a * 2, b + 1), "cpu")
    assert torch.equal(mixed[0], 2 * datasets.normalize(images, p.mean, p.std)) and torch.equal(mixed[1], labels + 1)


def test_evaluate_is_top1_top5_of_the_logits_in_eval_mode():
    model = finetune.from_encoder(encoder(), 6, 0.5, 0)
    with torch.no_grad():
        model.vit.head.weight.normal_()
    p = prep(n=20, classes=6)
    model.train()
    got = finetune.evaluate(model, p.train_x, p.train_y, p.mean, p.std)
    assert not model.training
    with torch.no_grad():
        logits = model(datasets.normalize(p.train_x, p.mean, p.std))
    top = logits.topk(5, dim=1).indices
    assert got["top1"] == pytest.approx((top[:, 0] == p.train_y).float().mean().item())
    assert got["top5"] == pytest.approx((top == p.train_y[:, None]).any(1).float().mean().item())


# ---- the training loop ---------------------------------------------------------------------------------

def run(monkeypatch, **over):
    """finetune() on a tiny model, recording each step's seed, batch, lr per group, loss and clipping."""
    rec = {"seeds": [], "lrs": [], "losses": [], "clips": [], "evals": [], "batches": None, "entries": []}
    real_seed, real_loss, real_eval = finetune.seed_step, finetune.loss_fn, finetune.evaluate
    real_batches, real_opt = engine.step_batches, finetune.optimizer

    monkeypatch.setattr(finetune, "seed_step", lambda seed, step: (rec["seeds"].append((seed, step)),
                                                                   real_seed(seed, step)))

    def loss_fn(settings, mixup):
        crit = real_loss(settings, mixup)
        def wrapped(logits, y):
            loss = crit(logits, y) * over.get("loss_scale", 1.0)
            rec["losses"].append(loss.item())
            return loss
        return wrapped

    def optimizer(model, lr, weight_decay, layer_decay):
        opt = real_opt(model, lr, weight_decay, layer_decay)
        rec["opt_args"] = (lr, weight_decay, layer_decay)
        opt.register_step_pre_hook(
            lambda o, a, k: rec["lrs"].append([(g["lr"], g["lr_scale"]) for g in o.param_groups]))
        return opt

    def step_batches(*args):
        rec["batches"] = args
        return real_batches(*args)

    def evaluate(model, images, labels, mean, std, precision="fp32", desc=""):
        rec["evals"].append((len(images), precision))
        return real_eval(model, images, labels, mean, std, precision)

    def clip(params, max_norm, *a, **k):
        rec["clips"].append((len(list(params)), max_norm))

    monkeypatch.setattr(finetune, "loss_fn", loss_fn)
    monkeypatch.setattr(finetune, "optimizer", optimizer)
    monkeypatch.setattr(engine, "step_batches", step_batches)
    monkeypatch.setattr(finetune, "evaluate", evaluate)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    settings = dict(SETTINGS, **{k: v for k, v in over.items() if k in SETTINGS})
    p = prep(n=over.get("n", 24))
    model = finetune.from_encoder(encoder(), 3, 0.0, 0)
    metrics, history = finetune.finetune(model, p, Finetune.of(settings), seed=over.get("seed", 2), device="cpu",
                                         on_epoch=rec["entries"].append)
    return metrics, history, rec, model, p, settings


def test_the_loop_steps_seeds_lrs_losses_and_history(monkeypatch):
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    before = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    metrics, history, rec, model, p, s = run(monkeypatch, n=28, batch_size=8, epochs=3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == before   # global RNGs restored
    spe = 28 // 8                                                                # 3 steps an epoch, 4 images left
    assert rec["seeds"] == [(2, t) for t in range(3 * spe)]
    assert rec["batches"][2:] == (8, 2, slice(None), 0, 3 * spe) and rec["batches"][0] is p.train_x
    lr = 0.02 * 8 / 256
    assert rec["opt_args"] == (lr, 0.05, 0.5)
    from types import SimpleNamespace
    lrs = engine.lr_schedule(SimpleNamespace(epochs=3, warmup_epochs=1, lr=lr, min_lr=1e-4), spe)
    assert len(rec["lrs"]) == 3 * spe
    for t, groups in enumerate(rec["lrs"]):
        for group_lr, scale in groups:
            assert group_lr == pytest.approx(lrs[t].item() * scale, rel=1e-12)
    assert [h["epoch"] for h in history] == [0, 1, 2] and rec["entries"] == history
    for e, h in enumerate(history):
        assert h["train_loss"] == pytest.approx(sum(rec["losses"][e * spe:(e + 1) * spe]) / spe, rel=1e-5)
        assert h["lr"] == pytest.approx(lrs[(e + 1) * spe - 1].item())
    assert rec["evals"] == [(6, "fp32")] * 3 and rec["clips"] == []
    assert history[-1]["val_top1"] == metrics["top1"]
    assert metrics == finetune.evaluate(model, p.val_x, p.val_y, p.mean, p.std)


def test_the_batch_is_capped_at_the_train_split(monkeypatch):
    _, history, rec, *_ = run(monkeypatch, n=12, batch_size=64, epochs=2)
    assert rec["batches"][2] == 12 and len(rec["seeds"]) == 2 and rec["opt_args"][0] == pytest.approx(0.02 * 12 / 256)


def test_clip_grad_clips_every_trained_parameter(monkeypatch):
    _, _, rec, model, *_ = run(monkeypatch, clip_grad=0.5, epochs=1)
    trained = sum(1 for p in model.vit.parameters() if p.requires_grad)
    assert rec["clips"] == [(trained, 0.5)] * 3


def test_a_non_finite_loss_stops_with_advice(monkeypatch):
    with pytest.raises(PipelineError, match=r"^non-finite fine-tuning loss \(nan\) in epoch 0; lower finetune\.blr "
                                            r"or change finetune\.precision$"):
        run(monkeypatch, loss_scale=float("nan"), epochs=2)


def test_training_changes_the_model_and_learns_its_loss_down(monkeypatch):
    _, history, rec, model, *_ = run(monkeypatch, epochs=4, n=24, batch_size=6, blr=0.5)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert not torch.equal(model.vit.head.bias, torch.zeros(3))


def test_the_model_is_moved_to_the_device(monkeypatch):
    moved = []
    real = torch.nn.Module.to
    monkeypatch.setattr(finetune.Classifier, "to", lambda self, *a, **k: (moved.append(a), real(self, *a, **k))[1])
    run(monkeypatch, epochs=1)
    assert moved == [("cpu",)]


# ---- the curve -----------------------------------------------------------------------------------------

def test_curve_draws_train_loss_and_val_top1_percent_per_epoch(monkeypatch, tmp_path):
    import pipeline.plots

    saved = []
    monkeypatch.setattr(pipeline.plots, "save_png", lambda fig, path: saved.append((fig, path)))
    history = [{"epoch": 0, "train_loss": 2.0, "val_top1": 0.25}, {"epoch": 1, "train_loss": 1.5, "val_top1": 0.5}]
    finetune.plot_curve(history, tmp_path / "c.png", "the title")
    (fig, path), = saved
    assert path == tmp_path / "c.png"
    ax, acc = fig.axes
    loss, = ax.get_lines()
    top1, = acc.get_lines()
    assert list(loss.get_xdata()) == [1, 2] and list(loss.get_ydata()) == [2.0, 1.5]
    assert list(top1.get_xdata()) == [1, 2] and list(top1.get_ydata()) == [25.0, 50.0]
    assert loss.get_label() == "train loss" and top1.get_label() == "val top-1"
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "train loss" and acc.get_ylabel() == "val top-1 (%)"
    assert list(ax.get_xticks()) == [1, 2] and ax.get_title() == "the title"
    finetune.plot_curve(history, tmp_path / "d.png", "t")
    assert math.isclose(saved[1][0].get_figwidth(), 6)
