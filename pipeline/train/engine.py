"""The one training loop: AdamW, per-step warm-up + cosine, clipping, mixed precision, resumable state.

Every random draw of a step (crop, flip, mask, and drop-path: pipeline.models.encoder.step_draws) comes from a generator
seeded by (seed, global step), and the epoch's sample order from one seeded by (seed, epoch). So a run resumed from
any saved step replays exactly the same batches, masks and dropped paths: on CPU it ends bit-identical to an
uninterrupted run. A streamed dataset (data.format stream, pipeline.data.stream) is cropped per image by DataLoader
workers instead, each crop and flip drawn from (seed, epoch, image index): replayed alike, whatever the workers.

`Run.initial_optimizer_state` starts a fresh (not resumed) run from another run's AdamW moments and step
(named_optimizer_state; dBOT's carry_optimizer_state); `TrainResult.optimizer` is the run's own at its end.

Precision (`TrainConfig.precision`, see pipeline.hardware): fp32, bf16 autocast, or fp16 autocast with a
GradScaler, whose scale is part of the saved state.

The state (model incl. teacher, optimiser, grad scaler, step, running epoch sums, history, tracking run id) is
saved atomically at every epoch end and at least every `checkpoint_every_min` minutes, only while the
loss and the weights are finite. A non-finite loss stops the run with an error; the last good state stays on disk.

In a multi-process job (pipeline.train.distributed) `batch_size` is the global batch: each process trains on its
rows through DistributedDataParallel (`distributed.wrap`), which averages the gradients over the processes in
buckets all-reduced while backward still runs; clipping and the optimiser step then see the averaged
gradients. Each process sums its own losses; the sums are averaged once per epoch, at its end, so every
process logs the same epoch loss and stops alike on a non-finite one. Only rank 0 shows progress, calls
on_epoch and saves the state (the unwrapped model's state dict: the same keys as a one-process run); the weights it
checks before a save are where a non-finite loss on another rank shows.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pipeline import checkpoint, hardware, ranks
from pipeline.data.datasets import normalize
from pipeline.data.steps import augment, batch_indices, stream_key
from pipeline.errors import PipelineError
from pipeline.models.encoder import step_draws
from pipeline.train import distributed


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float                   # peak lr, after warm-up
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    clip_grad: float | None
    precision: str              # auto | fp32 | bf16 | fp16 (pipeline.hardware.resolve on the run's device)
    crop_scale: tuple[float, float]
    hflip: bool
    checkpoint_every_min: float
    seed: int
    config_hash: str            # a saved state is only resumed if it was made with the same hash (params, code)
    desc: str = "train"         # progress bar label
    compile: str | None = None  # torch.compile backend for the model's forward (e.g. inductor); None = eager


@dataclass
class TrainData:
    """What the model trains on: uint8 images (N, C, H, W), a tensor or a streamed split
    (pipeline.data.stream.StreamImages: decoded and cropped per step by DataLoader workers, for the same rows of the
    same batch_indices; see step_batches), normalised with the train split's per-channel mean and std; the labels
    (N,) of a model that `needs_labels`."""
    images: object
    mean: list[float]
    std: list[float]
    labels: torch.Tensor | None = None


@dataclass
class Run:
    """Where and how one run goes: its resumable state file, the hook called with each epoch's metrics (rank 0),
    values stored in the state (e.g. a tracking run id), the device (None: pipeline.hardware.device()), and the
    AdamW moments and step a fresh (not resumed) run starts from (named_optimizer_state of another run)."""
    state_path: Path
    on_epoch: Callable[[dict], None] = lambda m: None
    extra: dict | None = None
    device: str | None = None
    initial_optimizer_state: dict | None = None


@dataclass
class TrainResult:
    history: list[dict]                         # one dict per epoch: epoch, loss, lr, images_per_s, seconds
    images_seen: int
    wall_s: float
    extra: dict = field(default_factory=dict)   # values the caller stored in the state (e.g. run id)
    optimizer: dict = field(default_factory=dict)  # the final optimiser state by parameter name (named_optimizer_state)


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> torch.Tensor:
    """Per-step lr: linear warm-up from 0, then half-cosine to min_lr (as MAE, indexed by global step)."""
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    steps = torch.arange(total, dtype=torch.float64)
    cos = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + torch.cos(math.pi * (steps - warm) / max(1, total - warm)))
    return torch.where(steps < warm, cfg.lr * steps / max(1, warm), cos)


NO_WEIGHT_DECAY = ("*token", "*pos_embed")     # fnmatch patterns of parameter names: tokens, learnable positions


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups, timm's param_groups_weight_decay: no weight decay on biases, norms and 1-D params, nor on
    tokens and positions (NO_WEIGHT_DECAY: every parameter whose name ends in "token" (cls, mask tokens) or
    "pos_embed" (when learnable)); frozen parameters in no group; the decayed group first (the order of states saved
    by the hand-written grouping this replaced, so they resume; tests/test_param_groups.py pins the groups).
    BootMAE's optimiser skips its no_weight_decay() names, {pos_embed, cls_token} (BootMAE optim_factory.py:65,
    modeling_pretrain_bootmae.py no_weight_decay), as timm's ViT does; MAE's timm 0.3.2 add_weight_decay decays
    the 3-D cls and mask tokens. Here no token is decayed (params pretrain.weight_decay)."""
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
    return sorted(groups, key=lambda group: group["weight_decay"] == 0)


def named_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """The optimiser's per-parameter state (AdamW: step, exp_avg, exp_avg_sq) keyed by parameter name: detached
    tensors on the parameters' device (no copy); on the CPU, plain tensors for torch.save and
    torch.load(weights_only=True)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v.detach() for k, v in state.items()} for p, state in opt.state.items() if id(p) in names}


def load_named_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> list[str]:
    """Start `opt` from `state` (named_optimizer_state of a model of the same architecture): every parameter of
    the same name and shape takes its moments and step; the others (e.g. a head of another width) start fresh,
    and their names are returned. The groups' settings (lr, weight decay) stay `opt`'s own."""
    names = {id(p): n for n, p in model.named_parameters()}
    current = opt.state_dict()
    ids = [i for group in current["param_groups"] for i in group["params"]]
    tensors = [p for group in opt.param_groups for p in group["params"]]
    carried, fresh = {}, []
    for index, p in zip(ids, tensors):
        saved = state.get(names[id(p)])
        if saved is None or saved["exp_avg"].shape != p.shape:
            fresh.append(names[id(p)])
        else:
            carried[index] = {k: v.clone() for k, v in saved.items()}
    opt.load_state_dict({"state": carried, "param_groups": current["param_groups"]})
    return fresh


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95 as MAE) with param_groups; fused: one kernel per parameter tensor instead of a
    chain of per-op loops (3% of the default MAE step on a 2-core AMX Xeon, more on a GPU)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), fused=True)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_key(seed) * 1_000_003 + step)


def step_batches(images, labels: torch.Tensor | None, batch_size: int, seed: int, rows: slice, start: int,
                 total: int):
    """(uint8 batch, its labels or None, cropped) of steps start..total-1: this process's rows of
    batch_indices(n, batch_size, seed, step). From a uint8 tensor: images[idx], not yet cropped (make_batch
    augments it). From a stream (pipeline.data.stream.StreamImages): decoded and already cropped by its workers."""
    if isinstance(images, torch.Tensor):
        for step in range(start, total):
            idx = batch_indices(len(images), batch_size, seed, step)[rows]
            yield images[idx], None if labels is None else labels[idx], False
    else:
        for x, y in images.train_batches(batch_indices, batch_size, seed, rows, start, total):
            yield x, y, True


def make_batch(batch_u8: torch.Tensor, mean: list[float], std: list[float], cfg: TrainConfig,
               gen: torch.Generator, device: str, cropped: bool = False) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> the augmented, normalised float batch on `device` (batched, no loop).

    The uint8 batch moves first (a quarter of the float bytes; pinned, asynchronous on CUDA), so augmentation
    and normalisation run on the device; the random draws stay on the CPU generator. A `cropped` batch (a
    stream's: its workers did the crops) is only normalised."""
    batch_u8 = hardware.to_device(batch_u8, device)
    x = batch_u8 if cropped else augment(batch_u8, gen, tuple(cfg.crop_scale), cfg.hflip)
    return normalize(x, mean, std)


def train(model: nn.Module, data: TrainData, cfg: TrainConfig, run: Run) -> TrainResult:
    """Train `model` on data.images: forward(imgs, generator, step) -> (loss, outputs), on the schedule `cfg`.

    Optional hooks: `start_schedule(steps_per_epoch, total_steps)` once before the first step, and
    `after_step(step)` after every optimiser step (see pipeline/methods/__init__.py). A model with
    `needs_labels` also gets the batch's labels (N,) as a keyword. The hooks are called on `model` itself,
    the forward through `distributed.wrap(model)` (DDP in a multi-process job). `run.initial_optimizer_state`
    is loaded only when the run starts fresh, never over a resumed state.
    """
    images, mean, std, labels = data.images, data.mean, data.std, data.labels
    state_path, on_epoch, initial_optimizer_state = run.state_path, run.on_epoch, run.initial_optimizer_state
    device = run.device or hardware.device()
    amp = hardware.resolve(cfg.precision, device)
    model.to(device)
    n, world = images.shape[0], ranks.world()
    bs = min(cfg.batch_size, n)
    spe = n // bs
    if bs % world.size:
        raise PipelineError(f"batch size {bs} does not divide by {world.size} processes (launch.tasks)")
    rows = world.rows(bs)
    lrs = lr_schedule(cfg, spe).tolist()           # Python floats: no tensor read per step
    opt, scaler = make_optimizer(model, cfg), amp.grad_scaler()
    st = _resume(state_path, cfg, model, opt, scaler, run.extra or {})
    if initial_optimizer_state and st["step"] == 0:    # a fresh run (a saved state is always past step 0)
        fresh = load_named_optimizer_state(model, opt, initial_optimizer_state)
        if fresh and world.is_main:
            print(f"note: the carried optimizer state has no moments for {', '.join(fresh)}; they start at zero",
                  file=sys.stderr)
    st["loss_sum"] = st["loss_sum"].to(device)     # summed on the device: no host-device sync per step
    if cfg.compile:
        model.compile(backend=cfg.compile)         # in place: the state dict keeps its keys
    net = distributed.wrap(model, device)          # DDP over the processes (from rank 0's weights), else model
    total = cfg.epochs * spe
    if hasattr(model, "start_schedule"):
        model.start_schedule(spe, total)   # methods with step-dependent parts (EMA momenta, loss ramps)
    bar = tqdm(total=total * bs, initial=st["step"] * bs, unit="img", unit_scale=True, desc=cfg.desc,
               file=sys.stderr, mininterval=2.0, smoothing=0.1, dynamic_ncols=True, disable=not world.is_main)
    last_save, t_epoch, step = time.monotonic(), time.monotonic(), st["step"]
    needs_labels = getattr(model, "needs_labels", False)
    batches = step_batches(images, labels if needs_labels else None, bs, cfg.seed, rows, step, total)
    model.train()
    while step < total:
        epoch = step // spe
        batch_u8, batch_y, cropped = next(batches)
        batch_labels = {"labels": batch_y} if needs_labels else {}
        with ranks.batch_rows(rows, bs):      # this process's rows of the step's random draws
            loss = train_step(net, opt, batch_u8, mean, std, cfg, lrs[step], step, device, batch_labels, amp,
                              scaler, cropped)
        st["loss_sum"] += loss.detach().float()
        step += 1
        st["step"] = step
        bar.update(bs)
        if step % spe == 0:
            _end_epoch(st, epoch, spe, bs, lrs[step - 1], time.monotonic() - t_epoch, state_path, model, opt, scaler,
                       on_epoch if world.is_main else None)
            t_epoch = last_save = time.monotonic()
        elif world.is_main and time.monotonic() - last_save > 60 * cfg.checkpoint_every_min:
            _save(st, state_path, model, opt, scaler)
            last_save = time.monotonic()
    batches.close()
    bar.close()
    return TrainResult(st["history"], st["images_seen"], st["wall_s"], st["extra"], named_optimizer_state(model, opt))


def train_step(model, opt, batch_u8, mean, std, cfg: TrainConfig, lr: float, step: int, device: str,
               batch_labels: dict, amp: hardware.Precision, scaler: torch.amp.GradScaler,
               cropped: bool = False) -> torch.Tensor:
    """One optimiser step in precision `amp`, as train() runs it (also what the benchmarks time,
    pipeline.bench.throughput / dataset): the step's batch (make_batch), forward, backward, clipping, AdamW at `lr`, the
    method's after_step hook. `scaler` scales the loss for fp16 (disabled otherwise: a no-op); returns the loss."""
    gen = step_generator(cfg.seed, step)
    x = make_batch(batch_u8, mean, std, cfg, gen, device, cropped)
    for group in opt.param_groups:
        group["lr"] = lr
    with amp.autocast(model), step_draws(gen):       # drop-path draws from the step's generator too
        loss, _ = model(x, gen, step, **batch_labels)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    trained = [p for g in opt.param_groups for p in g["params"]]
    if cfg.clip_grad:
        scaler.unscale_(opt)               # clip the true gradients, not the scaled ones (fp16)
        nn.utils.clip_grad_norm_(trained, cfg.clip_grad, foreach=True)
    scaler.step(opt)                       # fp16: skips the step if a gradient overflowed, then adapts the scale
    scaler.update()
    inner = distributed.unwrap(model)      # the method's hooks live on the module DDP wraps
    if hasattr(inner, "after_step"):
        inner.after_step(step)             # e.g. the EMA teacher's update
    return loss


def _end_epoch(st, epoch, spe, bs, lr, seconds, state_path, model, opt, scaler, on_epoch) -> None:
    loss = (distributed.average(st["loss_sum"]) / spe).item()     # every rank: the same loss, the same decision
    if not math.isfinite(loss):
        raise PipelineError(f"non-finite loss ({loss}) in epoch {epoch}; the last good state is kept "
                            f"in {state_path}; lower the lr or train in another precision")
    metrics = {"epoch": epoch, "loss": loss, "lr": lr, "seconds": seconds,
               "images_per_s": spe * bs / max(seconds, 1e-9)}
    st["history"].append(metrics)
    st["images_seen"] += spe * bs
    st["wall_s"] += seconds
    st["loss_sum"] = torch.zeros_like(st["loss_sum"])
    if on_epoch is not None:                # None: not rank 0 of a multi-process job
        on_epoch(metrics)
        _save(st, state_path, model, opt, scaler)


def _save(st: dict, state_path: Path, model: nn.Module, opt, scaler) -> None:
    """Never overwrite the last good state with a diverged one: not when this process's losses since the epoch began
    are not finite, nor when the weights are not (the last step's update can make them so from a finite loss, and in
    a multi-process job another rank's non-finite loss reaches rank 0 only through them)."""
    if not torch.isfinite(st["loss_sum"]) or not distributed.weights_finite(model):
        return
    checkpoint.save_state(state_path, dict(st, loss_sum=st["loss_sum"].cpu(), model=model.state_dict(),
                                           optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                                           attention=hardware.attention_choices()))


def _resume(state_path: Path, cfg: TrainConfig, model, opt, scaler, extra: dict) -> dict:
    fresh = {"step": 0, "loss_sum": torch.zeros(()), "history": [], "images_seen": 0, "wall_s": 0.0,
             "config_hash": cfg.config_hash, "extra": dict(extra)}
    saved = checkpoint.load_state(state_path)
    if saved is None:
        return fresh
    if saved.get("config_hash") != cfg.config_hash:
        print(f"note: not resuming {state_path}: it was made with other params or code "
              f"({saved.get('config_hash')} != {cfg.config_hash}); starting fresh", file=sys.stderr)
        return fresh
    model.load_state_dict(saved.pop("model"))
    opt.load_state_dict(saved.pop("optimizer"))
    if saved.get("scaler"):                # {} when the scaler was disabled (not fp16)
        scaler.load_state_dict(saved.pop("scaler"))
    hardware.keep_attention_choices(saved.pop("attention"))   # the kernels the run measured and ran
    print(f"resuming {state_path} at step {saved['step']}", file=sys.stderr)
    return saved


def saved_extra(state_path: Path, config_hash: str) -> dict:
    """The caller's values (e.g. the tracking run id) from a resumable state, if it would be resumed."""
    saved = checkpoint.load_state(state_path)
    return saved["extra"] if saved and saved.get("config_hash") == config_hash else {}
