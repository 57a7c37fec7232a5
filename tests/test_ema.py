"""Unit tests of the EMA teacher and its momentum schedules."""
import math

import pytest
import torch
from torch import nn

from pipeline.models.ema import (
    EMASchedule,
    EMATeacher,
    momentum_from_tau,
    momentum_from_time_constant,
    momentum_schedule,
    piecewise_schedule,
    repo_rcmae_schedule,
)


def linear(w: float, b: float) -> nn.Linear:
    layer = nn.Linear(1, 1)
    with torch.no_grad():
        layer.weight.fill_(w)
        layer.bias.fill_(b)
    return layer


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_update_is_the_ema_formula():
    student = linear(1.0, -2.0)
    teacher = EMATeacher(student)
    for w, b, m in ((3.0, 0.5, 0.75), (-1.0, 4.0, 0.5)):   # dyadic values: float32 arithmetic is exact
        student.weight.data.fill_(w)
        student.bias.data.fill_(b)
        teacher.update(student, m)
    expected_w = 0.5 * (0.75 * 1.0 + (1 - 0.75) * 3.0) + (1 - 0.5) * -1.0
    expected_b = 0.5 * (0.75 * -2.0 + (1 - 0.75) * 0.5) + (1 - 0.5) * 4.0
    assert (teacher.module.weight.item(), teacher.module.bias.item()) == (expected_w, expected_b)
    assert (student.weight.item(), student.bias.item()) == (-1.0, 4.0)


def test_update_copies_buffers_and_stays_in_eval_mode():
    student = net(0)
    teacher = EMATeacher(student)
    student.train()(torch.randn(8, 3))      # moves the student's BatchNorm running stats
    teacher.train()
    teacher.update(student, 0.99)
    assert not teacher.training and not teacher.module[1].training
    assert torch.equal(teacher.module[1].running_mean, student[1].running_mean)


def test_teacher_gets_no_gradient_and_its_output_is_a_constant():
    student = net(0)
    teacher = EMATeacher(student)
    x = torch.randn(5, 3)
    target = teacher(x)
    assert not target.requires_grad and not target.is_inference()
    ((student(x) - target) ** 2).mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_tuple_and_dict_outputs_are_cloned():
    class Two(nn.Module):
        def forward(self, x):
            return x * 2, {"a": x + 1}

    out, extra = EMATeacher(Two())(torch.ones(2))
    assert torch.equal(out, torch.full((2,), 2.0)) and not extra["a"].is_inference()


def test_init_copy_equals_source_and_random_equals_fresh():
    source, fresh = net(0), net(1)
    copied = EMATeacher(source)
    assert all(torch.equal(a, b) for a, b in zip(copied.module.state_dict().values(), source.state_dict().values()))
    assert copied.module is not source
    random = EMATeacher(source, init="random", fresh=fresh)
    assert all(torch.equal(a, b) for a, b in zip(random.module.parameters(), net(1).parameters()))
    assert all(not p.requires_grad for p in random.parameters())


def test_mismatches_are_value_errors():
    with pytest.raises(ValueError, match="names differ"):
        EMATeacher(nn.Linear(2, 2)).update(nn.Sequential(nn.Linear(2, 2)), 0.9)
    with pytest.raises(ValueError, match="shapes differ"):
        EMATeacher(nn.Linear(2, 2), init="random", fresh=nn.Linear(2, 3))
    with pytest.raises(ValueError, match=r'^EMATeacher\(init="random"\) needs the freshly initialised module `fresh`$'):
        EMATeacher(nn.Linear(2, 2), init="random")
    with pytest.raises(ValueError, match="unknown EMA teacher init 'swa'; known: \"copy\", \"random\""):
        EMATeacher(nn.Linear(2, 2), init="swa")


def test_the_teacher_starts_without_the_sources_gradients():
    source = nn.Linear(2, 2)
    source(torch.ones(1, 2)).sum().backward()
    assert all(p.grad is not None for p in source.parameters())
    assert all(p.grad is None for p in EMATeacher(source).parameters())
    fresh = nn.Linear(2, 2)
    fresh(torch.ones(1, 2)).sum().backward()
    assert all(p.grad is None for p in EMATeacher(source, init="random", fresh=fresh).parameters())


def test_mismatch_errors_name_the_first_three_differences():
    """The names that only one side has (not the shared ones), and the mismatched shapes, three at most."""
    teacher = EMATeacher(nn.ParameterDict({k: nn.Parameter(torch.zeros(1)) for k in "abcdef"}))
    with pytest.raises(ValueError, match=r"names differ: \['a', 'b', 'c'\]$"):
        teacher.update(nn.ParameterDict({k: nn.Parameter(torch.zeros(1)) for k in "ef"}), 0.9)
    with pytest.raises(ValueError, match=r"shapes differ: \['a', 'b', 'c'\]$"):
        teacher.update(nn.ParameterDict({k: nn.Parameter(torch.zeros(2)) for k in "abcdef"}), 0.9)


def test_state_dict_round_trip_restores_the_teacher_exactly():
    class Method(nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.student = net(seed)
            self.teacher = EMATeacher(self.student)

    a = Method(0)
    for _ in range(3):
        with torch.no_grad():
            for p in a.student.parameters():
                p.add_(torch.randn_like(p))
        a.teacher.update(a.student, 0.9)
    b = Method(1)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.teacher.state_dict().values(), b.teacher.state_dict().values()))
    assert not torch.equal(a.teacher.module[0].weight, a.student[0].weight)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_endpoints_and_monotonic(kind):
    m = momentum_schedule(kind, 0.996, 1.0, epochs=5, steps_per_epoch=7)
    assert m.dtype == torch.float64 and m.shape == (35,)
    assert m[0].item() == 0.996 and m[-1].item() == 1.0
    assert (m.diff() > 0).all()


def test_cosine_matches_byol_formula_and_constant_ignores_end():
    m = momentum_schedule("cosine", 0.99, 1.0, epochs=2, steps_per_epoch=5)
    t = torch.arange(10, dtype=torch.float64)
    assert torch.allclose(m, 1.0 - (1.0 - 0.99) * (torch.cos(math.pi * t / 9) + 1) / 2, atol=1e-15)
    assert (momentum_schedule("constant", 0.99, 1.0, 3, 4) == 0.99).all()


def test_per_epoch_schedule_is_constant_within_an_epoch():
    m = momentum_schedule("cosine", 0.9, 1.0, epochs=4, steps_per_epoch=6, per_epoch=True).view(4, 6)
    assert (m == m[:, :1]).all()
    assert m[0, 0].item() == 0.9 and m[-1, 0].item() == 1.0 and (m[:, 0].diff() > 0).all()


def test_two_steps_go_from_start_to_end():
    assert momentum_schedule("linear", 0.9, 0.99, 1, 2).tolist() == [0.9, 0.99]
    assert momentum_schedule("cosine", 0.9, 0.99, 2, 1, per_epoch=True).tolist() == [0.9, 0.99]


def test_ema_schedule_per_epoch_update_counts_one_update_per_epoch():
    """update "epoch": the time constants count epochs of one update each (m = exp(-1 / tau)), the momentum is the
    epoch's, and it applies after the epoch's last step only; update "step": one update per step."""
    spec = {"schedule": "linear", "tau_epochs": [1.0, 2.0]}
    per_epoch = EMASchedule(dict(spec, update="epoch"))
    per_epoch.start(steps_per_epoch=4, total_steps=8)
    assert [per_epoch.momentum(s) for s in range(8)] == [None, None, None, math.exp(-1), None, None, None,
                                                         math.exp(-1 / 2)]
    per_step = EMASchedule(dict(spec, update="step"))
    per_step.start(steps_per_epoch=4, total_steps=8)
    assert per_step.momentum(0) == math.exp(-1 / 4) and per_step.momentum(7) == math.exp(-1 / 8)
    assert momentum_from_tau(None, 4) == 1.0                   # no time constant: a frozen teacher
    piecewise = EMASchedule({"schedule": "piecewise", "tau_epochs": [1.0, 2.0], "breakpoints": [0.5],
                             "update": "epoch"})
    piecewise.start(steps_per_epoch=2, total_steps=4)
    assert [piecewise.momentum(s) for s in range(4)] == [None, math.exp(-1), None, math.exp(-1 / 2)]
    with pytest.raises(ValueError, match=r"schedule cosine takes tau_epochs \[start, end\], got 3"):
        EMASchedule({"schedule": "cosine", "tau_epochs": [1.0, 2.0, 3.0], "update": "step"}).start(2, 4)


def test_ema_schedule_repo_is_rcmaes_official_indexing():
    repo = EMASchedule({"schedule": "repo", "tau_epochs": [1.0, 2.0], "update": "step"})
    repo.start(steps_per_epoch=4, total_steps=12)
    assert torch.equal(repo.momenta, repo_rcmae_schedule(math.exp(-1 / 4), math.exp(-1 / 8), 3, 4))
    assert repo.momentum(4) == math.exp(-1 / 4)                       # restarts at every epoch


def test_single_step_or_epoch_stays_at_start_and_unknown_kind_is_an_error():
    assert momentum_schedule("cosine", 0.9, 1.0, 1, 1).tolist() == [0.9]
    assert momentum_schedule("linear", 0.9, 1.0, 1, 3, per_epoch=True).tolist() == [0.9] * 3
    with pytest.raises(ValueError, match="cosine, linear, constant"):
        momentum_schedule("step", 0.9, 1.0, 2, 2)


def test_repo_rcmae_schedule_restarts_every_epoch_and_stays_near_start():
    epochs, spe, start, end = 100, 50, 0.996, 1.0
    m = repo_rcmae_schedule(start, end, epochs, spe)
    per_epoch = m.view(epochs, spe)
    assert (per_epoch == per_epoch[0]).all() and (per_epoch[0].diff() > 0).all()
    assert m[0].item() == start and m.max() == m[spe - 1]
    # t / T < 1 / epochs, so m - start < (end - start) * sin^2(pi / (2 epochs)), i.e. < 1e-6 here
    assert m.max() < start + (end - start) * math.sin(math.pi / (2 * epochs)) ** 2 < start + 1e-6
    assert momentum_schedule("cosine", start, end, epochs, spe)[-1] == end


def test_time_constant_helper():
    m = momentum_from_time_constant(2.5, 40)
    assert abs(m ** 100 - math.exp(-1)) < 1e-9
    for tau, steps in ((0, 40), (1.0, 0)):
        with pytest.raises(ValueError, match=f"need tau_epochs > 0 and steps_per_epoch > 0, got {tau}, {steps}"):
            momentum_from_time_constant(tau, steps)


def official_bootmae_decay(epoch: int, dynamic: bool = True, start: float = 0.999) -> float:
    """LightDXY/BootMAE utils.py:L586-593 (adjust_ema_momentum), transcribed."""
    if epoch < 100:
        return start + epoch / 100 * (0.9999 - start)
    if dynamic:
        return 0.9999 + min(300, epoch - 100) / 300 * (0.99999 - 0.9999)
    return 0.9999


@pytest.mark.parametrize("epochs", [800, 801])
def test_piecewise_schedule_is_bootmaes_official_decay(epochs):
    """Breakpoints at epochs 100 and 400 (as fractions of the run), decays 0.999 / 0.9999 / 0.99999: every
    epoch's momentum is the official code's, constant within the epoch; without the last piece (ViT-L,
    no --model_ema_dynamic) it stays at 0.9999."""
    m = piecewise_schedule([0.999, 0.9999, 0.99999], [100 / epochs, 400 / epochs], epochs, 3).view(epochs, 3)
    assert m.dtype == torch.float64 and (m == m[:, :1]).all()
    official = torch.tensor([official_bootmae_decay(e) for e in range(epochs)], dtype=torch.float64)
    assert torch.allclose(m[:, 0], official, rtol=0, atol=1e-12)
    large = piecewise_schedule([0.999, 0.9999], [100 / epochs], epochs, 1)
    assert torch.allclose(large, torch.tensor([official_bootmae_decay(e, dynamic=False) for e in range(epochs)],
                                              dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="2 breakpoints need 3 momenta"):
        piecewise_schedule([0.9, 0.99], [0.1, 0.5], epochs, 1)
    with pytest.raises(ValueError, match="increase"):
        piecewise_schedule([0.9, 0.99, 0.999], [0.5, 0.5], epochs, 1)
    with pytest.raises(ValueError, match=r"within \(0, 1\]"):
        piecewise_schedule([0.9, 0.99, 0.999], [0.5, 1.5], epochs, 1)


def test_piecewise_schedule_reaches_its_last_momentum_exactly():
    """A breakpoint at 1 (the end of training) is allowed; from the last breakpoint on, the momentum is the last
    one exactly, not the end of the interpolation (0.472 + (0.101 - 0.472) rounds to another float)."""
    assert piecewise_schedule([0.9, 0.99], [1.0], 4, 1).tolist() == pytest.approx([0.9, 0.9225, 0.945, 0.9675])
    assert 0.472 + (0.101 - 0.472) != 0.101
    assert piecewise_schedule([0.472, 0.101], [0.5], 2, 1).tolist() == [0.472, 0.101]


def test_bootmae_default_momentum_spec_gives_the_official_momenta_at_imagenet_steps_per_epoch():
    """params' bootmae.momentum (time constants 3.2, 32, 320 epochs at breakpoints 0.125, 0.5) at ImageNet's
    ~313 steps per epoch (batch 4096) is the official per-step decay within 3e-6 (the taus are rounded),
    applied every step."""
    from pipeline import config

    spec = config._read_yaml(config.BASE)["bootmae"]["momentum"]
    assert spec["schedule"] == "piecewise" and spec["update"] == "step"
    schedule = EMASchedule(spec)
    epochs, spe = 800, 313
    schedule.start(spe, epochs * spe)
    got = schedule.momenta.view(epochs, spe)
    assert (got == got[:, :1]).all() and all(schedule.momentum(s) is not None for s in range(spe))
    official = torch.tensor([official_bootmae_decay(e) for e in range(epochs)], dtype=torch.float64)
    assert (got[:, 0] - official).abs().max() < 3e-6
    short = EMASchedule(spec)                  # 12 epochs of 63 steps: the same shape, at this data's momenta
    short.start(63, 12 * 63)
    assert short.momentum(0) == pytest.approx(momentum_from_time_constant(3.2, 63))
    assert short.momentum(11 * 63) == pytest.approx(momentum_from_time_constant(320.0, 63))
