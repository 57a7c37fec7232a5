"""EMA ("mean") teachers of a sub-network, and their momentum schedules (RC-MAE, SdAE, BootMAE).

The teacher is a child module of the method, so its weights travel with the model's state dict and a
resumed run continues from the same teacher. It never receives gradients: it is frozen, always in eval
mode, and updated only by `update`, teacher = m * teacher + (1 - m) * student, parameter by parameter.
Schedules are per-optimiser-step float64 tensors, indexed by global step like the engine's lr schedule.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from pipeline.models.teacher import no_graph


def _paired(teacher: nn.Module, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Both modules' parameters matched by name, in order; ValueError if names or shapes differ."""
    t, s = dict(teacher.named_parameters()), dict(student.named_parameters())
    if list(t) != list(s):
        raise ValueError(f"teacher and student parameter names differ: {sorted(set(t) ^ set(s))[:3]}")
    shapes = [k for k in t if t[k].shape != s[k].shape]
    if shapes:
        raise ValueError(f"teacher and student parameter shapes differ: {shapes[:3]}")
    return list(t.values()), list(s.values())


def _cloned(out):
    """Inference-mode outputs -> normal tensors (tensor, or tuple/list/dict of them), usable as constants."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, dict):
        return {k: _cloned(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_cloned(v) for v in out)
    return out


class EMATeacher(nn.Module):
    def __init__(self, source: nn.Module, init: str = "copy", fresh: nn.Module | None = None):
        """init="copy": start from a deep copy of `source`; init="random": start from `fresh`, a module of
        the same architecture with its own initialisation (e.g. SdAE's teacher)."""
        super().__init__()
        if init == "copy":
            module = copy.deepcopy(source)
        elif init == "random":
            if fresh is None:
                raise ValueError('EMATeacher(init="random") needs the freshly initialised module `fresh`')
            _paired(fresh, source)
            module = fresh
        else:
            raise ValueError(f'unknown EMA teacher init {init!r}; known: "copy", "random"')
        module.zero_grad(set_to_none=True)
        self.module = module.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> EMATeacher:
        return super().train(False)   # always in eval mode, whatever the student does

    @torch.no_grad()
    def update(self, source: nn.Module, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * source, for every parameter; buffers copied."""
        teacher, student = _paired(self.module, source)
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)
        student_buffers = dict(source.named_buffers())
        for name, buf in self.module.named_buffers():
            buf.copy_(student_buffers[name])

    def forward(self, *args, **kw):
        """The teacher's outputs, as normal (non-inference) tensors that carry no graph."""
        return self.call("forward", *args, **kw)

    def call(self, name: str, *args, **kw):
        """Run the teacher's method `name` (e.g. RC-MAE's `reconstruct`) as `forward` does."""
        with no_graph():
            out = getattr(self.module, name)(*args, **kw)
        return _cloned(out)


_SHAPES = {
    "cosine": lambda f: (1 - torch.cos(math.pi * f)) / 2,
    "linear": lambda f: f,
    "constant": torch.zeros_like,
}


def momentum_schedule(kind: str, start: float, end: float, epochs: int, steps_per_epoch: int,
                      per_epoch: bool = False) -> torch.Tensor:
    """Per-step momenta (float64, epochs * steps_per_epoch) going from `start` at t=0 to `end` at t=T.

    t is the global step and T the last one; with per_epoch, t is the epoch index (constant within an
    epoch, as SdAE updates its schedule per epoch). "cosine" is BYOL/DINO's
    m(t) = end - (end - start) * (cos(pi t / T) + 1) / 2, "linear" a straight line, "constant" `start`.
    """
    if kind not in _SHAPES:
        raise ValueError(f"unknown momentum schedule {kind!r}; known: {', '.join(_SHAPES)}")
    steps = torch.arange(epochs * steps_per_epoch, dtype=torch.float64)
    t, last = (steps // steps_per_epoch, epochs - 1) if per_epoch else (steps, len(steps) - 1)
    weight = _SHAPES[kind](t / max(last, 1))   # a single step / epoch (T = 0) stays at start
    return torch.lerp(torch.tensor(start, dtype=torch.float64), torch.tensor(end, dtype=torch.float64), weight)


def repo_rcmae_schedule(start: float, end: float, epochs: int, steps_per_epoch: int) -> torch.Tensor:
    """The official RC-MAE code's schedule: the cosine indexed by the step *within the epoch* out of the
    total number of steps (t = step % steps_per_epoch, T = epochs * steps_per_epoch). It restarts every
    epoch and never passes t / T = 1 / epochs, so it stays near `start` (about 0.996) for the whole run."""
    t = torch.arange(epochs * steps_per_epoch, dtype=torch.float64) % steps_per_epoch
    weight = _SHAPES["cosine"](t / (epochs * steps_per_epoch))
    return torch.lerp(torch.tensor(start, dtype=torch.float64), torch.tensor(end, dtype=torch.float64), weight)


def piecewise_schedule(momenta: list[float], breakpoints: list[float], epochs: int,
                       steps_per_epoch: int) -> torch.Tensor:
    """Per-step momenta (float64, epochs * steps_per_epoch), set once per epoch: linear in f = e / E (epoch e of
    E) through (0, momenta[0]), (breakpoints[0], momenta[1]), ..., (breakpoints[-1], momenta[-1]), and
    constant after the last breakpoint. breakpoints: fractions of training, increasing, in (0, 1].

    BootMAE's official schedule (LightDXY/BootMAE utils.py:L586-593, applied at the start of every epoch,
    run_pretraining.py:L390; the EMA then updates after every step): 0.999 + e / 100 (0.9999 - 0.999) for
    e < 100, then 0.9999 + min(300, e - 100) / 300 (0.99999 - 0.9999) with --model_ema_dynamic (ViT-B,
    scripts/pretrain/bash_pre_BootMAE_Base_800.sh:L38-40, 801 epochs) or 0.9999 without (ViT-L), i.e.
    momenta [0.999, 0.9999, 0.99999] at breakpoints [100 / E, 400 / E] (0.125, 0.5 at E = 800).
    """
    if len(momenta) != len(breakpoints) + 1:
        raise ValueError(f"{len(breakpoints)} breakpoints need {len(breakpoints) + 1} momenta, got {len(momenta)}")
    xs = [0.0, *breakpoints]
    if any(b <= a for a, b in zip(xs, xs[1:])) or xs[-1] > 1:
        raise ValueError(f"breakpoints must increase within (0, 1], got {breakpoints}")
    epoch = torch.arange(epochs * steps_per_epoch, dtype=torch.float64) // steps_per_epoch
    f = epoch / epochs
    out = torch.full_like(f, float(momenta[-1]))
    for (x0, x1), (m0, m1) in zip(zip(xs, xs[1:]), zip(momenta, momenta[1:])):
        inside = (f >= x0) & (f < x1)
        out[inside] = m0 + (f[inside] - x0) / (x1 - x0) * (m1 - m0)
    return out


def momentum_from_time_constant(tau_epochs: float, steps_per_epoch: int) -> float:
    """The per-step momentum m = exp(-1 / (tau_epochs * steps_per_epoch)) of an EMA whose time constant
    is tau_epochs epochs. Momenta tuned at batch 4096 on ImageNet (a few hundred steps per epoch) do not
    transfer to small datasets, so the params give the EMA's time constant in epochs instead."""
    if tau_epochs <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"need tau_epochs > 0 and steps_per_epoch > 0, got {tau_epochs}, {steps_per_epoch}")
    return math.exp(-1.0 / (tau_epochs * steps_per_epoch))


def momentum_from_tau(tau_epochs: float | None, updates_per_epoch: int) -> float:
    """`momentum_from_time_constant`, with tau None meaning a frozen teacher (momentum 1)."""
    return 1.0 if tau_epochs is None else momentum_from_time_constant(tau_epochs, updates_per_epoch)


class EMASchedule:
    """The momentum of every optimiser step, from a method's `momentum` params:

        {schedule: cosine | linear | constant | repo, tau_epochs: [start, end], update: step | epoch}
        {schedule: piecewise, tau_epochs: [t0, t1, ..., tn], breakpoints: [b1, ..., bn], update: ...}

    The momenta are those of EMAs with the given time constants in epochs (None = 1.0).
    update "step" applies the EMA after every optimiser step; "epoch" once per epoch, after its last
    step, with the epoch's momentum (SdAE). "repo" is RC-MAE's official within-epoch indexing;
    "piecewise" is BootMAE's official per-epoch schedule (`piecewise_schedule`), its breakpoints
    fractions of training (other schedules ignore `breakpoints`).
    """

    def __init__(self, spec: dict):
        self.spec = spec

    def start(self, steps_per_epoch: int, total_steps: int) -> None:
        """Build the per-step momenta once the engine knows the run's length."""
        per_epoch = self.spec["update"] == "epoch"
        epochs, updates = total_steps // steps_per_epoch, (1 if per_epoch else steps_per_epoch)
        momenta = [momentum_from_tau(t, updates) for t in self.spec["tau_epochs"]]
        if self.spec["schedule"] == "piecewise":
            self.momenta = piecewise_schedule(momenta, self.spec["breakpoints"], epochs, steps_per_epoch)
            self.steps_per_epoch = steps_per_epoch
            return
        if len(momenta) != 2:
            raise ValueError(f"schedule {self.spec['schedule']} takes tau_epochs [start, end], got {len(momenta)}")
        start, end = momenta
        if self.spec["schedule"] == "repo":
            self.momenta = repo_rcmae_schedule(start, end, epochs, steps_per_epoch)
        else:
            self.momenta = momentum_schedule(self.spec["schedule"], start, end, epochs, steps_per_epoch, per_epoch)
        self.steps_per_epoch = steps_per_epoch

    def momentum(self, step: int) -> float | None:
        """The momentum to apply after optimiser step `step`, or None when no update is due."""
        if self.spec["update"] == "epoch" and (step + 1) % self.steps_per_epoch:
            return None
        return float(self.momenta[step])


class EMAMethod(nn.Module):
    """Base of the methods with an EMA teacher (SdAE, RC-MAE, BootMAE).

    A subclass sets `self.teacher` (an EMATeacher), `self.ema_schedule` (an EMASchedule) and
    `self.evaluate_weights` ("student" or "teacher"), and defines `ema_source()` (the student part the
    teacher follows) and `teacher_encoder` (the teacher's Encoder). The engine calls `start_schedule`
    once and `after_step` after every optimiser step.
    """

    def start_schedule(self, steps_per_epoch: int, total_steps: int) -> None:
        self.ema_schedule.start(steps_per_epoch, total_steps)
        self.total_steps = total_steps

    def after_step(self, step: int) -> None:
        momentum = self.ema_schedule.momentum(step)
        if momentum is not None:
            self.teacher.update(self.ema_source(), momentum)

    def evaluated_encoder(self) -> nn.Module:
        """The encoder whose weights the pretrain node writes: the student's or the EMA teacher's."""
        return self.teacher_encoder if self.evaluate_weights == "teacher" else self.encoder
