"""Every registered method on the tiny preset: forward/backward, finite loss, teacher without gradient."""
import pytest
import torch

from pipeline import config
from pipeline.encoder import build_encoder
from pipeline.methods import METHODS, NEEDS_TEACHER
from pipeline.teacher import FrozenTeacher


@pytest.fixture(scope="module")
def params():
    return config.load("tiny")


def make(name, params, seed=0):
    teacher = None
    if name in NEEDS_TEACHER:
        teacher = FrozenTeacher(build_encoder(params["model"], 8, 1, seed=0))
    return METHODS[name](params, 1, seed, teacher)


@pytest.mark.parametrize("name", sorted(METHODS))
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


@pytest.mark.parametrize("name", sorted(METHODS))
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
