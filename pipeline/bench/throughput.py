"""Benchmark (not a test): speed, memory and compute efficiency of every method's training step at a preset.

    python -m pipeline.bench.throughput --preset default [--steps 20] [--curve-steps 30] [--precisions bf16 fp16]
        [--out DIR]
    python -m pipeline.bench.throughput --preset imagenet --batch-size 8 --steps 2 --warmup 1   # ViT-B/16, 224 px

One run measures, on this machine (--device auto: CUDA if available, else the CPU with all of torch's threads):

- which precision the pipeline's default (`precision: auto`, pipeline.hardware) picks here and why
  (default_precision, default_precision_reason, cpu_capability), and which precisions it measures: fp32, plus
  every other precision this device runs natively (bf16 on a GPU with bf16 or a CPU with AMX / AVX512-BF16, fp16
  on a GPU). A precision the machine only emulates is skipped with the reason printed (skipped_precisions), unless
  asked for with --precisions: an emulated bf16 step on an AVX2-only CPU takes ~17x the fp32 one;
- peak_gflops: the matmul ceiling, the best of 5 square n x n matmuls (n = --peak-size), per measured precision;
- attention: per measured precision, MAE's two attention calls at the preset's token counts (encoder: cls +
  visible patches; decoder: cls + every patch), each kernel's forward and backward time (flash, memory-efficient
  and math SDPA backends, the explicit matmuls; pipeline.hardware.attention_timings) and the one the pipeline
  runs there (pipeline.hardware.attention_kernel);
- rows, one per method x measured precision: the real training step (engine.train_step: augmentation,
  masking, forward, backward, clipping, AdamW) on random uint8 images of the preset's shape, median of --steps
  timed steps after 3 warm-up steps -> step_s, images_per_s; peak_mem_mb (MB = 2^20 bytes; CUDA:
  max_memory_allocated; CPU: each measurement in a fresh child process, its ru_maxrss minus its RSS just before
  the model is built); the analytic FLOPs of a step (pipeline.models.flops.flops_per_image "train" x batch: student
  forward + backward = 3 x forward, teacher forward, transformer-block matmuls only) -> gflops_per_s and mfu
  (against peak_gflops_here: the median GFLOP/s of one n x n matmul run after each timed step, in the same
  process; the shared CPU's speed drifts, so the step and its ceiling are measured under the same conditions);
  the step-time ratio to MAE next to the FLOP ratio to MAE (same precision); breakdown: one more step under the
  torch profiler, its time split into matmul, attention forward / backward, casts, optimizer and other
  (pipeline.bench.breakdown; --no-breakdown leaves it out). The rows of the default precision are
  measured through `precision: auto` itself (setting "auto"); default_vs_fastest holds, per method, the default's
  images/s over the best images/s of any measured precision (target: >= 0.95 on every machine);
- with --max-batch, on a GPU: per method, the largest per-GPU batch (8, 16, 32, ...) whose step fits, its peak
  memory and images/s (max_batch);
- data_loading: images/s of making the batches alone, as engine.train_step does before the model (index the uint8
  train images, augment with the step's generator, normalise), and its ratio to MAE's training images/s;
- modes: MAE trained --curve-steps steps on the real train images in every measured precision and with
  torch.compile (--compile-backend, in the default precision), same init, batches and masks: step time (median
  after the first steps), first-step time (holds the compilation), loss curve, final-loss difference to fp32.
  A compile failure is recorded as its error message. The curves are overlaid in modes_loss.png.
  Data loading and the modes need the preset's images: a streamed preset (imagenet) skips them (--no-modes too).

Paper scale: --preset imagenet is MAE's ViT-B/16 at 224 px (57.4 GFLOP per trained MAE image); --batch-size sets
the per-device batch (the preset's 4096 is a global batch), --depth cuts the encoder (and the decoders) to that
many blocks at full width and token count (the test runs one block at batch 1), --warmup sets the untimed steps,
--compile compiles every row's model. Every step runs on random images: no data folder is needed.

Reading MFU (model FLOPs utilisation) = achieved GFLOP/s / the matmul peak of the precision the step runs in:
the share of the machine's dense-matmul ceiling that the step turns into model FLOPs. Everything that is not a
large matmul (augmentation, masking, norms, softmax, the optimiser, Python and dispatch overhead, small matmuls
far from the peak) lowers it, so small models such as the tiny preset sit far below 1. The FLOP count leaves out
patch embedding, heads and norms, so MFU slightly under-counts. A step ratio above the FLOP ratio: the method
spends more time per FLOP than MAE (non-matmul work of its teacher or loss). Timings need an otherwise idle
machine: on CPU cores shared with another job, torch's threads wait for each other and steps get 10-50x slower.

Writes bench.json (`rows`: one dict per method x precision; `machine`: pipeline.hardware.describe_machine, with
the load average at the end), bench.md and modes_loss.png under --out (default results/bench/<machine class>:
cpu-avx2, cpu-amx, gpu-<name>, ...; pipeline.hardware.machine_class; a preset other than default in its own
<preset>/ folder below it).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import gc
import json
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from pipeline import config, hardware
from pipeline.bench import attention_calls, render
from pipeline.bench.breakdown import step_breakdown
from pipeline.checkpoint import write_json
from pipeline.data.datasets import prepare
from pipeline.data.steps import batch_indices
from pipeline.layout import RESULTS
from pipeline.methods import METHODS, NEEDS_LABELS, NEEDS_TEACHER
from pipeline.models.encoder import build_encoder
from pipeline.models.flops import flops_per_image
from pipeline.models.teacher import FrozenTeacher
from pipeline.train import engine

PRECISIONS = ("fp32", "bf16", "fp16")
TARGET = 0.95         # the default precision's images/s against the fastest measured, for every method
WARMUP = 3            # untimed steps before every timing


def timed(fn, device: str) -> tuple[float, object]:
    """(seconds, fn()), the device synchronised before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, value


def matmul_gflops(dtype: torch.dtype, n: int, device: str, reps: int = 5) -> float:
    """Best GFLOP/s of an n x n by n x n matmul (2 n^3 FLOPs) over `reps` runs after 2 warm-up runs."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    times = [timed(lambda: a @ b, device)[0] for _ in range(reps + 2)]
    return 2 * n ** 3 / min(times[2:]) / 1e9


class PeakProbe:
    """The matmul ceiling measured between training steps: one n x n matmul after each step (operands and output
    allocated once, up front, so they sit outside any memory reading taken after). On a machine whose speed
    drifts (a shared CPU: 150-300 GFLOP/s fp32 within minutes here), the median over the timed steps is the
    peak under the same conditions as the steps."""

    def __init__(self, precision: str, n: int, device: str):
        dtype = hardware.DTYPES[hardware.resolve(precision, device).name]     # "auto": what it picks here
        self.a, self.b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        self.out, self.n, self.device, self.gflops = torch.empty_like(self.a), n, device, []

    def __call__(self) -> None:
        seconds, _ = timed(lambda: torch.matmul(self.a, self.b, out=self.out), self.device)
        self.gflops.append(2 * self.n ** 3 / seconds / 1e9)


def train_config(params: dict, precision: str) -> engine.TrainConfig:
    """The pretrain section's step settings in `precision`, at a constant lr = blr * batch_size / 256."""
    t = params["pretrain"]
    return engine.TrainConfig(epochs=1, batch_size=t["batch_size"], lr=t["blr"] * t["batch_size"] / 256,
                              min_lr=t["min_lr"], warmup_epochs=0, weight_decay=t["weight_decay"],
                              clip_grad=t["clip_grad"], precision=precision, crop_scale=t["crop_scale"],
                              hflip=t["hflip"], checkpoint_every_min=1e9, seed=0, config_hash="bench")


def build(params: dict, method: str, cfg: engine.TrainConfig, device: str, steps: int) -> tuple:
    """(model, AdamW) of `method` as the pretrain stage builds them (seed 0; dBOT: a random frozen teacher)."""
    d = params["data"]
    teacher = None
    if method in NEEDS_TEACHER:
        teacher = FrozenTeacher(build_encoder(params["model"], d["img_size"], d["channels"], seed=1))
    labels = {"num_classes": 10} if method in NEEDS_LABELS else {}
    model = METHODS[method](params, d["channels"], 0, teacher, **labels).train().to(device)
    opt = engine.make_optimizer(model, cfg)
    if hasattr(model, "start_schedule"):
        model.start_schedule(steps, steps)     # one epoch: EMA updates as in training
    return model, opt


def train_steps(params: dict, method: str, cfg, device: str, images: torch.Tensor, mean: list, std: list,
                steps: int, compile_backend: str | None = None, between=None,
                profiled: dict | None = None) -> list[tuple[float, float]]:
    """(seconds, loss) of each of `steps` training steps (engine.train_step) of a fresh model on uint8 `images`;
    with compile_backend, the model is torch.compile'd first (so step 0 holds the compilation); `between()`,
    if given, runs after each step, outside its time; `profiled`, if given, receives the breakdown of one more
    step run under the torch profiler (pipeline.bench.breakdown.step_breakdown)."""
    model, opt = build(params, method, cfg, device, steps + (profiled is not None))
    if compile_backend:
        model.compile(backend=compile_backend)
    amp = hardware.resolve(cfg.precision, device)
    scaler = amp.grad_scaler()
    labels = torch.arange(len(images)) % 10

    def one(step: int) -> float:
        idx = batch_indices(len(images), cfg.batch_size, cfg.seed, step)
        batch_labels = {"labels": labels[idx]} if method in NEEDS_LABELS else {}
        return engine.train_step(model, opt, images[idx], mean, std, cfg, cfg.lr, step, device, batch_labels, amp,
                                 scaler).item()
    out = []
    for step in range(steps):
        out.append(timed(lambda: one(step), device))  # noqa: B023 (timed calls it now)
        if between:
            between()
    if profiled is not None:
        profiled.update(step_breakdown(lambda: one(steps), device))
    return out


@dataclasses.dataclass(frozen=True)
class Timing:
    """How each method's step is timed: `warmup` untimed steps first; with `breakdown`, one more step under the
    profiler (pipeline.bench.breakdown); with `compile_backend`, the model torch.compile'd (the warm-up steps
    hold the compilation)."""
    warmup: int = WARMUP
    breakdown: bool = False
    compile_backend: str | None = None


def time_method(params: dict, method: str, precision: str, steps: int, device: str, probe: PeakProbe,
                how: Timing = Timing()) -> dict:
    """{"step_s": seconds per training step of `method` on random images, "peak_gflops_here": the probe's
    matmul peak between the steps}, medians over `steps` steps after how.warmup untimed ones; with
    how.breakdown, also "breakdown": where the time of one more step went."""
    d, cfg = params["data"], train_config(params, precision)
    images = torch.randint(0, 256, (cfg.batch_size, d["channels"], d["img_size"], d["img_size"]), dtype=torch.uint8)
    profiled = {} if how.breakdown else None
    out = train_steps(params, method, cfg, device, images, [0.5] * d["channels"], [0.25] * d["channels"],
                      how.warmup + steps, how.compile_backend, between=probe, profiled=profiled)
    return {"step_s": statistics.median(t for t, _ in out[how.warmup:]),
            "peak_gflops_here": statistics.median(probe.gflops[how.warmup:]),
            **({"breakdown": profiled} if how.breakdown else {})}


def _rss_mb() -> float:
    """This process's resident memory now (Linux /proc; elsewhere its peak so far)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2 ** 20
    except OSError:
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


def _measure_child(params: dict, method: str, precision: str, steps: int, threads: int, peak_size: int,
                   how: Timing) -> dict:
    """Run in a fresh process: step time and matmul peak between the steps (time_method), and the peak memory
    above the RSS before the model is built (the probe's matrices are allocated before that reading)."""
    torch.set_num_threads(threads)
    probe = PeakProbe(precision, peak_size, "cpu")
    try:
        Path("/proc/self/clear_refs").write_text("5")   # Linux: restart the peak-RSS count from here
    except OSError:
        pass
    before = _rss_mb()
    timing = time_method(params, method, precision, steps, "cpu", probe, how)
    return {**timing, "peak_mem_mb": _peak_rss_mb() - before}


def measure(params: dict, method: str, precision: str, steps: int, device: str, pool, peak_size: int,
            how: Timing = Timing()) -> dict:
    """{"step_s", "peak_gflops_here", "peak_mem_mb"} (and with how.breakdown, "breakdown") of one method and
    precision: CUDA in this process, CPU in a fresh child. peak_gflops_here: the matmul peak measured between the
    steps, under the same conditions. The peak memory includes the profiled step (on the CPU the profiler's own
    records add a few MB)."""
    if device == "cpu":
        return pool.submit(_measure_child, params, method, precision, steps, torch.get_num_threads(),
                           peak_size, how).result()
    gc.collect()
    torch.cuda.empty_cache()
    probe = PeakProbe(precision, peak_size, device)
    torch.cuda.reset_peak_memory_stats()
    timing = time_method(params, method, precision, steps, device, probe, how)
    return {**timing, "peak_mem_mb": torch.cuda.max_memory_allocated() / 2 ** 20}


def child_pool() -> concurrent.futures.ProcessPoolExecutor:
    """One fresh process per task, one at a time: forkserver where the platform has it (its server imports torch
    and the methods once, so a child starts in a fraction of a second instead of ~5 s), else spawn."""
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    if ctx.get_start_method() == "forkserver":    # not this module itself: each child runs it as __mp_main__
        ctx.set_forkserver_preload(["pipeline.bench.render", "pipeline.data.datasets", "pipeline.train.engine",
                                    "pipeline.methods"])
    return concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1)


def make_row(params: dict, method: str, precision: str, measured: dict, mae: dict, peak: float,
             setting: str | None = None) -> dict:
    """One row of bench.json from a measurement, MAE's measurement (same precision) and the precision's matmul
    peak of the run.

    mfu: against the matmul peak measured between the steps (peak_gflops_here, see PeakProbe): like with like
    on a machine whose speed drifts. mfu_vs_run_peak: against the run's one peak measurement (peak_gflops).
    step_ratio_to_mae: the step times' ratio as measured, minutes apart; step_ratio_at_equal_peak: the same
    ratio with each step time scaled by its own peak_gflops_here, i.e. as if both ran at the same machine
    speed (= flop_ratio_to_mae x MAE's MFU / this MFU)."""
    row = {"method": method, "precision": precision, "setting": setting or precision,
           **throughput(params, method, measured)}
    return dict(row, mfu_vs_run_peak=row["gflops_per_s"] / peak, step_ratio_to_mae=measured["step_s"] / mae["step_s"],
                step_ratio_at_equal_peak=(measured["step_s"] * measured["peak_gflops_here"]
                                          / (mae["step_s"] * mae["peak_gflops_here"])),
                flop_ratio_to_mae=row["flops_per_step"] / (flops_per_image(params, "mae")["train"]
                                                           * params["pretrain"]["batch_size"]))


def throughput(params: dict, method: str, measured: dict) -> dict:
    """A measurement ({"step_s", "peak_gflops_here", ...}) with its images/s, analytic FLOPs per step, GFLOP/s
    and MFU at these params."""
    batch = params["pretrain"]["batch_size"]
    flops = flops_per_image(params, method)["train"] * batch
    gflops = flops / measured["step_s"] / 1e9
    return {**measured, "images_per_s": batch / measured["step_s"], "flops_per_step": flops,
            "gflops_per_s": gflops, "mfu": gflops / measured["peak_gflops_here"]}


def plan_precisions(device: str, asked: list[str] | None) -> tuple[hardware.Precision, list[str], dict[str, str]]:
    """(the default precision here, the precisions to measure, {skipped precision: why}). Measured: fp32 (the
    reference), the default, and either `asked` or every precision this device runs natively."""
    default = hardware.resolve("auto", device)
    wanted = asked if asked is not None else [p for p in PRECISIONS if hardware.native(p, device)[0]]
    measured = [p for p in PRECISIONS if p in {"fp32", default.name, *wanted}]
    skipped = {p: f"{hardware.native(p, device)[1]}: not native here; --precisions {' '.join(measured + [p])} "
                  "measures it" for p in PRECISIONS if p not in measured}
    return default, measured, skipped


def measure_rows(params: dict, steps: int, device: str, peaks: dict, peak_size: int, default: str,
                 progress, how: Timing = Timing()) -> list[dict]:
    """One row per measured precision (the keys of `peaks`) x method, timed as `how` says; the default
    precision's rows say "auto"."""
    rows, mae = [], None
    with child_pool() as pool:
        for precision in peaks:
            for method in ["mae"] + [m for m in METHODS if m != "mae"]:        # MAE first: the ratios' base
                setting = "auto" if precision == default else precision
                measured = measure(params, method, setting, steps, device, pool, peak_size, how)
                mae = measured if method == "mae" else mae
                rows.append(make_row(params, method, precision, measured, mae, peaks[precision], setting))
                progress(render.row_line(rows[-1]))
    return rows


def max_batch(params: dict, method: str, precision: str, device: str, peak_size: int, start: int = 8,
              limit: int = 8192) -> dict:
    """The largest per-device batch (start, 2 start, 4 start, ... up to `limit`) at which one training step of
    `method` in `precision` fits in the GPU's memory: {"method", "precision", "batch_size" (None: not even
    `start`), "peak_mem_mb", "images_per_s" (one step after one warm-up), "failed_at" (the first batch that did
    not fit, None if `limit` fitted)}."""
    best = {"method": method, "precision": precision, "batch_size": None, "peak_mem_mb": None,
            "images_per_s": None, "failed_at": None}
    batch = start
    while batch <= limit:
        try:
            measured = measure(sized(params, batch, None), method, precision, 1, device, None, peak_size,
                               Timing(warmup=1))
        except torch.OutOfMemoryError:
            return dict(best, failed_at=batch)
        best.update(batch_size=batch, peak_mem_mb=measured["peak_mem_mb"], images_per_s=batch / measured["step_s"])
        batch *= 2
    return best


def default_vs_fastest(rows: list[dict]) -> dict[str, float]:
    """Per method: the default precision's images/s over the best images/s of any measured precision."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        out[method] = next(r for r in mine if r["setting"] == "auto")["images_per_s"] / max(
            r["images_per_s"] for r in mine)
    return out


def data_loading(params: dict, data, device: str, steps: int, mae_images_per_s: float, precision: str) -> dict:
    """Images/s of making training batches exactly as engine.train_step does before the model."""
    cfg = train_config(params, precision)

    def batch(step: int) -> torch.Tensor:
        x = data.train_x[batch_indices(len(data.train_x), cfg.batch_size, cfg.seed, step)]
        return engine.make_batch(x, data.mean, data.std, cfg, engine.step_generator(cfg.seed, step), device)
    times = [timed(lambda: batch(step), device)[0] for step in range(WARMUP + steps)]  # noqa: B023 (called at once)
    per_s = min(cfg.batch_size, len(data.train_x)) / statistics.median(times[WARMUP:])
    return {"images_per_s": per_s, "ratio_to_mae_training": per_s / mae_images_per_s,
            "mae_precision": precision}


def mode_run(params: dict, data, mode: str, steps: int, device: str, backend: str = "inductor",
             compile_precision: str = "fp32") -> dict:
    """MAE's loss curve and step time in one mode: a precision (fp32 | bf16 | fp16) or compile (`backend`, in
    `compile_precision`)."""
    precision = compile_precision if mode == "compile" else mode
    run = {"precision": precision, **({"backend": backend} if mode == "compile" else {})}
    try:
        out = train_steps(params, "mae", train_config(params, precision), device, data.train_x, data.mean, data.std,
                          steps, compile_backend=backend if mode == "compile" else None)
    except Exception as e:      # torch.compile may fail on a machine (no compiler, unsupported op): record it
        if mode != "compile":
            raise
        return dict(run, error=f"{type(e).__name__}: {e}"[:2000])
    finally:
        if mode == "compile":
            torch._dynamo.reset()
    times, losses = [t for t, _ in out], [loss for _, loss in out]
    return dict(run, step_s=statistics.median(times[min(WARMUP, steps - 1):]), first_step_s=times[0],
                losses=losses, final_loss=losses[-1])


def measure_modes(params: dict, data, steps: int, device: str, backend: str, precisions: list[str], default: str,
                  progress) -> dict:
    """MAE's loss curve in each of `precisions` (fp32 first) and compiled in the `default` precision."""
    modes = {}
    for mode in [*precisions, "compile"]:
        modes[mode] = mode_run(params, data, mode, steps, device, backend, default)
        if "final_loss" in modes[mode]:
            modes[mode]["final_loss_diff_to_fp32"] = modes[mode]["final_loss"] - modes["fp32"]["final_loss"]
        progress(render.mode_line(mode, modes[mode]))
    return modes


class Progress:
    """Prints '[k/N] message (elapsed, ETA)'; the ETA assumes the measurements left take the mean time so far."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def __call__(self, message: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        print(f"[{self.done}/{self.total}] {message}  ({elapsed:.0f} s, ETA {eta:.0f} s)", flush=True)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default 20)")
    parser.add_argument("--curve-steps", type=int, default=30, help="steps of each mode's loss curve (>= 2)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                        help="precisions to measure besides fp32 and the default (default: those this device runs "
                             "natively; an emulated one is skipped, with the reason printed)")
    parser.add_argument("--warmup", type=int, default=WARMUP,
                        help=f"untimed steps before each method's timed ones (default {WARMUP})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per step on the device (default: the preset's pretrain.batch_size)")
    parser.add_argument("--depth", type=int, default=None,
                        help="encoder depth, and at most this many decoder blocks (default: the preset's; a small "
                             "depth keeps the preset's width and tokens for a quick check)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every row's model (--compile-backend; the warm-up steps hold the "
                             "compilation, so give --warmup >= 1)")
    parser.add_argument("--max-batch", action="store_true",
                        help="on a GPU: per method, the largest batch (8, 16, 32, ...) whose step fits in memory, "
                             "in the default precision, with its peak memory")
    parser.add_argument("--no-breakdown", action="store_true",
                        help="no profiled step per row (default: one, for the step breakdown)")
    parser.add_argument("--no-modes", action="store_true",
                        help="skip data loading and the modes (skipped anyway for a streamed preset: its images "
                             "are not on this machine)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.curve_steps < 2 or (args.batch_size or 1) < 1 or (args.depth or 1) < 1 or args.warmup < 0:
        parser.error("--steps, --batch-size and --depth must be >= 1, --warmup >= 0 and --curve-steps >= 2")
    return args


def sized(params: dict, batch_size: int | None, depth: int | None) -> dict:
    """The params with pretrain.batch_size = `batch_size` and the encoder's depth = `depth` (every decoder: at
    most `depth` blocks), each where given."""
    params = copy.deepcopy(params)
    if batch_size:
        params["pretrain"]["batch_size"] = batch_size
    if depth:
        params["model"]["depth"] = depth
        params["model"]["decoder_depth"] = min(params["model"]["decoder_depth"], depth)
        if "decoder_depth" in params["bootmae"]:                  # BootMAE's own decoders (preset imagenet)
            params["bootmae"]["decoder_depth"] = min(params["bootmae"]["decoder_depth"], depth)
    return params


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--preset, --device, --peak-size and --out, shared with pipeline.bench.scaling."""
    parser.add_argument("--preset", default="default")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto (default): CUDA if torch sees a GPU, else the CPU")
    parser.add_argument("--peak-size", type=int, default=None, help="matmul size n of the peak (2048 CPU, 8192 CUDA)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default results/bench/<machine class>, e.g. cpu-avx2, cpu-amx, gpu-h100)")


def setup(args) -> tuple[dict, str, int]:
    """(params of --preset, the device of --device, the matmul size of the peak); args.out defaults to
    results/bench/<machine class>, so each kind of machine keeps its own numbers."""
    device = hardware.device(args.device)
    args.out = args.out or RESULTS / "bench" / hardware.machine_class(device)
    params = config.load(args.preset, check_paths=False)   # the steps run on random images: no data folder needed
    return params, device, args.peak_size or (8192 if device == "cuda" else 2048)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.out is None and args.preset != "default":     # results/bench/<machine class>/<preset>/
        args.out = RESULTS / "bench" / hardware.machine_class(hardware.device(args.device)) / args.preset
    params, device, n = setup(args)
    params = sized(params, args.batch_size, args.depth)
    default, measured, skipped = plan_precisions(device, args.precisions)
    print(f"default precision: {default.name} ({default.reason})", flush=True)
    for precision, why in skipped.items():
        print(f"skipped {precision}: {why}", flush=True)
    streamed = params["data"]["format"] == "stream"
    no_modes = ("--no-modes" if args.no_modes else
                "a streamed preset (data.format stream): its images are not here" if streamed else None)
    progress = Progress(len(measured) * (1 + len(METHODS) + 2) + (0 if no_modes else 1 + len(measured) + 1)
                        + (len(METHODS) if args.max_batch and device == "cuda" else 0))
    peaks = {}
    for precision in measured:
        peaks[precision] = matmul_gflops(hardware.DTYPES[precision], n, device)
        progress(f"matmul peak {precision} (n={n}): {peaks[precision]:.1f} GFLOP/s")
    attention = attention_calls.measure(params, device, measured, progress)
    how = Timing(args.warmup, not args.no_breakdown, args.compile_backend if args.compile else None)
    rows = measure_rows(params, args.steps, device, peaks, n, default.name, progress, how)
    loading, modes = None, None
    if no_modes:
        print(f"skipped data loading and modes: {no_modes}", flush=True)
    else:
        data = prepare(params["data"], params["data"]["split_seed"])
        mae = next(r for r in rows if r["method"] == "mae" and r["setting"] == "auto")
        loading = data_loading(params, data, device, args.steps, mae["images_per_s"], default.name)
        progress(render.loading_line(loading))
        modes = measure_modes(params, data, args.curve_steps, device, args.compile_backend, measured, default.name,
                              progress)
    largest = []
    if args.max_batch and device == "cuda":
        for method in METHODS:
            largest.append(max_batch(params, method, default.name, device, n))
            progress(render.max_batch_line(largest[-1]))
    elif args.max_batch:
        print("skipped --max-batch: the largest batch is searched on a GPU only (a CPU swaps instead of failing)")
    ratios = default_vs_fastest(rows)
    result = {"default_precision": default.name, "default_precision_reason": default.reason,
              "cpu_capability": hardware.cpu_features()["capability"],
              "cpu": hardware.describe_cpu(hardware.cpu_features()),
              "default_vs_fastest": ratios, "default_meets_target": min(ratios.values()) >= TARGET,
              "measured_precisions": measured, "skipped_precisions": skipped,
              "preset": args.preset, "device": device, "device_name": hardware.device_name(device),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "batch_size": params["pretrain"]["batch_size"], "steps": args.steps, "warmup": args.warmup,
              "compiled": args.compile_backend if args.compile else None,
              "curve_steps": args.curve_steps,
              "model": params["model"], "img_size": params["data"]["img_size"],
              "machine": hardware.describe_machine(),     # with the load average at the end of the run
              "peak_matmul_size": n, "peak_gflops": peaks, "rows": rows, "attention": attention,
              "data_loading": loading, "modes": modes, "modes_skipped": no_modes, "max_batch": largest}
    write_json(args.out / "bench.json", result)
    render.write_markdown(result, args.out / "bench.md")
    written = ["bench.json", "bench.md"]
    if modes is not None:
        render.modes_loss(modes, args.out / "modes_loss.png")
        written.append("modes_loss.png")
    print(json.dumps({"written": [str(args.out / f) for f in written]}))
    return result


if __name__ == "__main__":
    main()
