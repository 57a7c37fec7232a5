"""Every registered method on the tiny preset: forward/backward, finite loss, teacher without gradient."""
import pytest
import torch

from pipeline import config
from pipeline.methods import EMA_METHODS, METHODS, NEEDS_LABELS, NEEDS_TEACHER
from pipeline.models.encoder import build_encoder
from pipeline.models.teacher import FrozenTeacher

MIM = sorted(set(METHODS) - NEEDS_LABELS)   # the masked-image-modelling methods


@pytest.fixture(scope="module")
def params():
    return config.load("tiny")


def make(name, params, seed=0):
    teacher = None
    if name in NEEDS_TEACHER:
        teacher = FrozenTeacher(build_encoder(params["model"], 8, 1, seed=0))
    return METHODS[name](params, 1, seed, teacher)


@pytest.mark.parametrize("name", MIM)
def test_forward_backward_finite(name, params):
    model = make(name, params)
    loss, out = model(torch.randn(4, 1, 8, 8), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert out["mask"].shape == (4, 16) and (out["mask"].sum(1) == 12).all()


@pytest.mark.parametrize("name", sorted(NEEDS_TEACHER))
def test_teacher_receives_no_gradient_and_is_not_optimised(name, params):
    model = make(name, params)
    before = [p.clone() for p in model.teacher.parameters()]
    loss, _ = model(torch.randn(4, 1, 8, 8), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))


@pytest.mark.parametrize("name", MIM)
def test_bf16_autocast_runs(name, params):
    model = make(name, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(torch.randn(4, 1, 8, 8), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)


def test_dbot_stage0_student_starts_as_its_random_teacher(params):
    """dBOT's stage-0 teacher is a frozen copy of the student's own random initialisation."""
    teacher = FrozenTeacher(build_encoder(params["model"], 8, 1, seed=params["seed"]))
    student = METHODS["dbot"](params, 1, params["seed"], teacher).encoder
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.encoder.state_dict().values()))


def test_dbot_loss_counts_cls_and_masked_tokens_only(params):
    model = make("dbot", params)
    x = torch.randn(2, 1, 8, 8)
    loss, out = model(x, torch.Generator().manual_seed(0))
    target = torch.nn.functional.layer_norm(model.teacher.targets(x), (32,), eps=1e-6)
    per = torch.nn.functional.smooth_l1_loss(out["pred"], target, reduction="none", beta=2.0).mean(-1)
    weights = torch.cat([torch.ones(2, 1), out["mask"]], 1)
    assert loss.item() == pytest.approx(((per * weights).sum() / weights.sum()).item(), rel=1e-5)


def _by_name(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.mark.parametrize("name", sorted(EMA_METHODS))
def test_ema_teacher_gets_no_gradient_and_follows_the_student_by_its_momentum(name, params):
    model = make(name, params)
    model.start_schedule(steps_per_epoch=2, total_steps=6)
    loss, _ = model(torch.randn(4, 1, 8, 8), torch.Generator().manual_seed(0), 0)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    opt.step()                                                         # the student moves, the teacher not yet
    teacher, student = _by_name(model.teacher.module), _by_name(model.ema_source())
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    momentum = model.ema_schedule.momentum(1)                          # step 1 ends epoch 0: due in every mode
    assert 0 < momentum < 1
    model.after_step(1)
    for k, v in model.teacher.module.named_parameters():
        assert torch.allclose(v, momentum * teacher[k] + (1 - momentum) * student[k], atol=1e-6), k


def test_sdae_updates_its_teacher_once_per_epoch_when_asked(params):
    params = dict(params, sdae=dict(params["sdae"], momentum=dict(params["sdae"]["momentum"], update="epoch")))
    model = make("sdae", params)
    model.start_schedule(steps_per_epoch=3, total_steps=9)
    assert [model.ema_schedule.momentum(s) is not None for s in range(9)] == [False, False, True] * 3
    params["sdae"]["momentum"]["update"] = "step"                        # the default: after every step
    model = make("sdae", params)
    model.start_schedule(steps_per_epoch=3, total_steps=9)
    assert all(model.ema_schedule.momentum(s) is not None for s in range(9))


def test_rcmae_teacher_sees_the_students_mask_and_starts_as_its_copy(params):
    model = make("rcmae", params)
    _, out = model(torch.randn(4, 1, 8, 8), torch.Generator().manual_seed(0))
    assert out["consistency_loss"].item() < 1e-10                     # same weights, same mask: same output
    assert model.evaluated_encoder() is model.teacher.module.encoder  # evaluate_weights: teacher


def test_sdae_teacher_sees_only_masked_patches_in_disjoint_folds(params):
    model = make("sdae", params)
    _, out = model(torch.randn(4, 1, 8, 8), torch.Generator().manual_seed(0))
    folds, mask = out["folds"], out["mask"]
    assert folds.shape == (4, 3, 4)                                    # 12 masked of 16 = 3 folds of 4
    for sample_folds, sample_mask in zip(folds, mask):
        ids = sample_folds.flatten()
        assert len(set(ids.tolist())) == 12 and (sample_mask[ids] == 1).all()


def test_sdae_teacher_init_random_or_student(params):
    key = "vit.blocks.0.attn.qkv.weight"
    for init, same in (("random", False), ("student", True)):        # the official code's, and the default
        model = make("sdae", dict(params, sdae=dict(params["sdae"], teacher_init=init)))
        teacher, student = _by_name(model.teacher.module), _by_name(model.encoder)
        assert torch.equal(teacher[key], student[key]) == same, init


def test_bootmae_ramps_the_feature_weight_per_epoch_and_masks_in_blocks(params):
    """Default ramp "epoch": w_f = min(4 w (e + 1) / E, w) for the step's epoch e of E (LightDXY/BootMAE
    run_pretraining.py:L386-387); ramp "step" is linear from 0 over the first quarter of the steps."""
    model = make("bootmae", params)
    model.start_schedule(steps_per_epoch=10, total_steps=100)
    official = [min(1.0 * (1 + step // 10) / 10 * 4, 1.0) for step in range(100)]
    assert [model.feature_weight(s) for s in range(100)] == pytest.approx(official, rel=1e-12)
    assert [model.feature_weight(s) for s in (0, 9, 10, 20, 99)] == pytest.approx([0.4, 0.4, 0.8, 1.0, 1.0])
    _, out = model(torch.randn(4, 1, 8, 8), torch.Generator().manual_seed(0), 10)
    assert (out["mask"].sum(1) == 12).all() and torch.isfinite(out["feature_loss"])
    per_step = METHODS["bootmae"](config.merge(params, {"bootmae": {"ramp": "step"}}), 1, 0)
    per_step.start_schedule(steps_per_epoch=10, total_steps=100)
    assert [per_step.feature_weight(s) for s in (0, 25, 99)] == [0.0, 1.0, 1.0]
    assert per_step.feature_weight(10) == pytest.approx(0.4)


def test_bootmae_feature_decoder_runs_at_the_encoder_width(params):
    """modeling_pretrain_bootmae.py:L341-353: the feature decoder's blocks, projection (down_1), mask token
    and head are at the encoder's width with the encoder's heads, and its mask tokens get the encoder's
    pos_embed (L492); the pixel decoder stays at decoder_dim. feature_decoder "decoder": both at decoder_dim."""
    m = params["model"]
    model = make("bootmae", params)
    pixel, feature = model.pixel_decoder, model.feature_decoder
    assert feature.embed.weight.shape == (m["embed_dim"], m["embed_dim"])
    assert feature.mask_token.shape[-1] == m["embed_dim"]
    assert feature.head.weight.shape == (m["embed_dim"], m["embed_dim"])
    assert all(blk.cross.heads == blk.block.attn.num_heads == m["num_heads"] for blk in feature.blocks)
    assert torch.equal(feature.pos, model.encoder.vit.pos_embed) and feature.positions == "masked"
    assert pixel.embed.weight.shape == (m["decoder_dim"], m["embed_dim"]) and pixel.pos.shape[-1] == m["decoder_dim"]
    assert pixel.mask_token is not feature.mask_token and pixel.embed is not feature.embed
    _, out = model(torch.randn(2, 1, 8, 8), torch.Generator().manual_seed(0))
    assert out["features"].shape == (2, 16, m["embed_dim"]) and out["pred"].shape == (2, 16, m["patch_size"] ** 2)
    narrow = METHODS["bootmae"](config.merge(params, {"bootmae": {"feature_decoder": "decoder"}}), 1, 0)
    assert narrow.feature_decoder.embed.weight.shape == (m["decoder_dim"], m["embed_dim"])
    assert narrow.feature_decoder.blocks[0].cross.heads == m["decoder_heads"]


def test_bootmae_losses_divide_by_the_number_of_masked_tokens(params):
    """run_pretraining.py:L450, L459: sum of centre-weighted per-token errors / masked count (default); the
    option loss_denominator "weights" divides by the sum of the centre weights instead."""
    from pipeline.models import losses

    x = torch.randn(4, 1, 8, 8)
    for denominator in ("masked", "weights"):
        model = METHODS["bootmae"](config.merge(params, {"bootmae": {"loss_denominator": denominator}}), 1, 0)
        _, out = model(x, torch.Generator().manual_seed(0))
        mask, weights = out["mask"], losses.center_weights(out["mask"], model.encoder.grid)
        target = losses.normalize_patches_per_channel(losses.patchify(x, model.patch), 1)
        err = ((out["pred"] - target) ** 2).mean(-1)
        total = (mask if denominator == "masked" else weights).sum()
        assert out["pixel_loss"].item() == pytest.approx(((weights * err).sum() / total).item(), rel=1e-5)


def test_bootmae_earlier_choices_remain_options(params):
    """Every official default's earlier alternative still builds and trains."""
    old = {"ramp": "step", "max_block": None, "block_attempts": 64, "loss_denominator": "weights",
           "feature_decoder": "decoder", "decoder_positions": "all", "block_order": "cross_self_mlp",
           "momentum": {"schedule": "linear", "tau_epochs": [3.2, 32.0], "update": "step"}}
    model = METHODS["bootmae"](config.merge(params, {"bootmae": old}), 1, 0)
    model.start_schedule(steps_per_epoch=2, total_steps=4)
    loss, out = model(torch.randn(4, 1, 8, 8), torch.Generator().manual_seed(0), 1)
    loss.backward()
    model.after_step(1)
    assert torch.isfinite(loss) and (out["mask"].sum(1) == 12).all()
    assert all(b.order == "cross_self_mlp" for b in model.pixel_decoder.blocks)
    assert model.pixel_decoder.positions == "all"


@pytest.mark.parametrize("feature_decoder,block_order", [("encoder", "self_cross_mlp"), ("decoder", "cross_self_mlp")])
def test_bootmae_flops_count_both_decoders_at_their_widths(params, feature_decoder, block_order):
    """pipeline.models.flops's analytic count of the two decoders' blocks equals torch's FLOP counter on them."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.hardware import attention_kernels
    from pipeline.models.encoder import encoder_flops
    from pipeline.models.flops import cross_attention_flops, flops_per_image, token_counts
    from pipeline.settings import Geometry

    p = config.merge(params, {"bootmae": {"feature_decoder": feature_decoder, "block_order": block_order}})
    model, m = METHODS["bootmae"](p, 1, 0), p["model"]
    num, visible, _ = token_counts(Geometry.of(p))
    counted = 0
    for dec in (model.pixel_decoder, model.feature_decoder):
        dim = dec.embed.out_features
        tokens, context = torch.randn(1, 1 + num, dim), torch.randn(1, 1 + visible, m["embed_dim"])
        with attention_kernels(dec, "cpu", reduced=True), FlopCounterMode(display=False) as counter:
            for block in dec.blocks:           # explicit attention matmuls: the counter misses SDPA on a CPU
                block(tokens, context)
        counted += counter.get_total_flops()
    flops = flops_per_image(p, "bootmae")
    assert flops["student_forward"] - encoder_flops(m["embed_dim"], m["depth"], 1 + visible) == counted
    assert flops["teacher_forward"] == encoder_flops(m["embed_dim"], m["depth"], 1 + num)
    assert cross_attention_flops(8, 1, 3, 2, 4) == 2 * (3 * 2 * 64 + 2 * 2 * 4 * 8) + 4 * 3 * 2 * 8


def test_supervised_learns_labels_through_the_engine(params, tmp_path):
    """The engine passes the batch's labels to a needs_labels model; a few epochs fit separable data."""
    from pipeline.train import engine

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    images = torch.where(labels[:, None, None, None].bool(), 200, 30).to(torch.uint8).expand(64, 1, 8, 8).clone()
    images += torch.randint(0, 20, images.shape, generator=gen, dtype=torch.uint8)
    model = METHODS["supervised"](params, 1, 0, num_classes=2)
    cfg = engine.TrainConfig(epochs=6, batch_size=16, lr=1e-3, min_lr=1e-5, warmup_epochs=1, weight_decay=0.0,
                             clip_grad=None, precision="fp32", crop_scale=(0.9, 1.0), hflip=False,
                             checkpoint_every_min=10, seed=0, config_hash="s")
    result = engine.train(model, engine.TrainData(images, [0.45], [0.3], labels), cfg, engine.Run(tmp_path / "s.pt"))
    assert result.history[-1]["loss"] < 0.7 * result.history[0]["loss"]
    with torch.no_grad():
        _, out = model.eval()((images.float() / 255 - 0.45) / 0.3, gen, 0, labels=labels)
    assert (out["logits"].argmax(1) == labels).float().mean() == 1.0


def test_bootmae_probe_block_writes_the_encoder_cut_after_that_block(params, tmp_path):
    from pipeline.models.encoder import load_encoder, save_encoder

    full = make("bootmae", params)
    cut = METHODS["bootmae"](config.merge(params, {"bootmae": {"probe_block": 1}}), 1, 0)
    assert full.evaluated_encoder() is full.encoder                      # null: the whole student
    enc = cut.evaluated_encoder()
    assert len(enc.vit.blocks) == 1 and enc.config["depth"] == 1 and len(cut.encoder.vit.blocks) == 2
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():                      # the cut encoder = the student's first block, then its final norm
        _, blocks = cut.encoder(x, return_blocks=(0,))
        assert torch.allclose(enc(x), cut.encoder.vit.norm(blocks[0]))
    save_encoder(tmp_path / "cut.safetensors", enc, {})
    loaded, _ = load_encoder(tmp_path / "cut.safetensors", params["model"], 1, params["data"]["img_size"])
    assert loaded.config["depth"] == 1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_init_depends_on_the_seed_only_not_the_global_generator(name, params):
    """torch seeds its global generator at random at start-up: a build must not draw from it."""
    extra = {"num_classes": 10} if name in NEEDS_LABELS else {}
    teacher = FrozenTeacher(build_encoder(params["model"], 8, 1, seed=0)) if name in NEEDS_TEACHER else None
    states = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        states.append(METHODS[name](params, 1, 0, teacher, **extra).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


DROPPING = {"dbot": {"drop_path": 0.2, "decoder_drop_path": 0.2}, "sdae": {}, "rcmae": {"drop_path": 0.3},
            "bootmae": {"drop_path": 0.3}, "mae": {"drop_path": 0.3}}


@pytest.mark.parametrize("name", sorted(DROPPING))
def test_students_drop_paths_and_teachers_never_do(name, params):
    """Stochastic depth (dbot 0.2 encoder + decoder, the official value; sdae 0.25 by default) acts on the student in
    training only: the frozen or EMA teacher stays in eval mode, so its targets do not depend on the step's draws."""
    from pipeline.models.encoder import DropPath, step_draws

    p = config.merge(params, {"model": {"decoder_depth": 2}, name: DROPPING[name]})
    model = make(name, p).train()
    assert any(isinstance(m, DropPath) for m in model.encoder.modules())
    x = torch.randn(4, 1, 8, 8)
    if not hasattr(model, "teacher"):
        return
    assert not any(m.training for m in model.teacher.modules())
    last = len(model.encoder.vit.blocks) - 1
    targets = {"dbot": lambda: model.teacher.targets(x), "rcmae": lambda: model.teacher.call("encoder", x),
               "sdae": lambda: model.teacher(x),
               "bootmae": lambda: model.teacher(x, return_blocks=(last,))[1][last]}[name]
    outs = []
    for seed in (0, 1):
        with step_draws(torch.Generator().manual_seed(seed)):
            outs.append(targets())
            student = model.encoder(x)
        outs.append(student)
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[1], outs[3])   # teacher fixed, student drops


def test_saved_encoder_carries_no_drop_path_into_the_evaluations(params, tmp_path):
    """save_encoder writes weights only; the loaded encoder has no drop path, and the in-training encoder gives the
    same features in eval mode (k-NN and linear probe extract features with the encoder in eval mode)."""
    from pipeline.evaluation.probes import extract_features
    from pipeline.models.encoder import DropPath, load_encoder, save_encoder, step_draws

    model = make("sdae", params).train()
    save_encoder(tmp_path / "e.safetensors", model.evaluated_encoder(), {})
    loaded, meta = load_encoder(tmp_path / "e.safetensors", params["model"], 1, params["data"]["img_size"])
    assert not any(isinstance(m, DropPath) for m in loaded.modules()) and "drop_path" not in meta["model"]
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    with step_draws(torch.Generator().manual_seed(0)):
        live = extract_features(model.encoder, images, [0.5], [0.25], "cls", progress=False)
    assert torch.equal(live, extract_features(loaded, images, [0.5], [0.25], "cls", progress=False))


def test_sdae_random_teacher_is_timm_initialised_with_learnable_positions(params):
    """The official teacher (sdae models_teacher.py:20-24): a timm ViT with timm's init and a learnable position
    embedding, not MAE's xavier init with fixed sin-cos positions; seeded apart from the student (seed + 2)."""
    from pipeline.models.encoder import sincos_2d

    model = make("sdae", config.merge(params, {"sdae": {"teacher_init": "random"}}))
    teacher, student = model.teacher.module.vit, model.encoder.vit
    assert (not torch.equal(teacher.pos_embed[0], sincos_2d(32, 4))
            and torch.equal(student.pos_embed[0], sincos_2d(32, 4)))
    assert abs(teacher.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.005          # timm: trunc-normal 0.02
    assert not any(p.requires_grad for p in model.teacher.parameters())
    before = teacher.pos_embed.clone()
    model.teacher.update(model.ema_source(), 0.5)          # the EMA moves its positions toward the student's
    assert torch.allclose(teacher.pos_embed, (before + student.pos_embed) / 2)
