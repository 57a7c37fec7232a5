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

    def train(self, mode: bool = True) -> "EMATeacher":
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
        with torch.inference_mode():
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

    The start and end momenta are those of EMAs with the given time constants in epochs (None = 1.0).
    update "step" applies the EMA after every optimiser step; "epoch" once per epoch, after its last
    step, with the epoch's momentum (SdAE). "repo" is RC-MAE's official within-epoch indexing.
    """

    def __init__(self, spec: dict):
        self.spec = spec

    def start(self, steps_per_epoch: int, total_steps: int) -> None:
        """Build the per-step momenta once the engine knows the run's length."""
        per_epoch = self.spec["update"] == "epoch"
        epochs, updates = total_steps // steps_per_epoch, (1 if per_epoch else steps_per_epoch)
        start, end = (momentum_from_tau(t, updates) for t in self.spec["tau_epochs"])
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
