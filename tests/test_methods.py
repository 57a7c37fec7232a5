"""Every registered method on the tiny preset: forward/backward, finite loss, teacher without gradient."""
import pytest
import torch

from pipeline import config
from pipeline.encoder import build_encoder
from pipeline.methods import EMA_METHODS, METHODS, NEEDS_LABELS, NEEDS_TEACHER

MIM = sorted(set(METHODS) - NEEDS_LABELS)   # the masked-image-modelling methods
from pipeline.teacher import FrozenTeacher


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


def test_bootmae_ramps_the_feature_weight_and_masks_in_blocks(params):
    model = make("bootmae", params)
    model.start_schedule(steps_per_epoch=10, total_steps=100)
    assert [model.feature_weight(s) for s in (0, 25, 99)] == [0.0, 1.0, 1.0]
    assert model.feature_weight(10) == pytest.approx(0.4)
    _, out = model(torch.randn(4, 1, 8, 8), torch.Generator().manual_seed(0), 10)
    assert (out["mask"].sum(1) == 12).all() and torch.isfinite(out["feature_loss"])


def test_supervised_learns_labels_through_the_engine(params, tmp_path):
    """The engine passes the batch's labels to a needs_labels model; a few epochs fit separable data."""
    from pipeline import engine

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    images = torch.where(labels[:, None, None, None].bool(), 200, 30).to(torch.uint8).expand(64, 1, 8, 8).clone()
    images += torch.randint(0, 20, images.shape, generator=gen, dtype=torch.uint8)
    model = METHODS["supervised"](params, 1, 0, num_classes=2)
    cfg = engine.TrainConfig(epochs=6, batch_size=16, lr=1e-3, min_lr=1e-5, warmup_epochs=1, weight_decay=0.0,
                             clip_grad=None, precision="fp32", crop_scale=(0.9, 1.0), hflip=False, checkpoint_every_min=10,
                             seed=0, config_hash="s")
    result = engine.train(model, images, [0.45], [0.3], cfg, tmp_path / "s.pt", labels=labels)
    assert result.history[-1]["loss"] < 0.7 * result.history[0]["loss"]
    with torch.no_grad():
        _, out = model.eval()((images.float() / 255 - 0.45) / 0.3, gen, 0, labels=labels)
    assert (out["logits"].argmax(1) == labels).float().mean() == 1.0


def test_bootmae_probe_block_writes_the_encoder_cut_after_that_block(params, tmp_path):
    from pipeline.encoder import load_encoder, save_encoder

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
    loaded, _ = load_encoder(tmp_path / "cut.safetensors", params, 1)
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
