"""Scaling benchmark (not a test): how the cost of a training step grows with the work it does.

    python -m pipeline.bench.scaling --preset default [--steps 10] [--precisions ...] [--out DIR]

Every point is MAE's real training step (pipeline.bench.throughput: engine.train_step, fresh child process, median of
--steps timed steps after warm-up) at the preset with one setting changed, in fp32 and every other precision this device
runs natively (bf16 autocast on a CPU with AMX / AVX512-BF16 or a GPU with bf16;
pipeline.bench.throughput.plan_precisions), or those of --precisions:

- tokens: data.img_size at the preset's patch size, and model.patch_size at the preset's image size
  (patches L = (img_size / patch_size)^2; the encoder sees 1 + L (1 - mask_ratio), the decoder 1 + L);
- width: model.embed_dim (heads fixed), and depth: model.depth;
- batch: pretrain.batch_size.

Each point records step_s, images_per_s, its analytic FLOPs (pipeline.models.flops), GFLOP/s, MFU (against the matmul
peak measured in the same process) and `flop_model_s`: the preset's own step time scaled by the FLOP ratio, the
time the point would take if the step cost were all matmul FLOPs at the preset's efficiency. Measured above the
line: overhead that does not shrink with the work (small models, small batches); below: larger matmuls run closer
to the peak.

- dbot_chain: a dBOT chain of --chain-stages stages trained one after the other in one process, in the default
  precision (`precision: auto` here) (stage k's frozen teacher is stage k-1's student, stage 0's a random encoder), each
  --chain-epochs epochs on the first --chain-images train images: wall seconds per stage and cumulative, against the
  number of stages.

Writes scaling.json (`sweeps`: name -> points; `dbot_chain`: stages), scaling.md and scaling.png under --out.
Peak memory against dataset size is the separate pipeline.bench.dataset (it generates image folders).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from pipeline.bench import throughput
from pipeline.bench.render import scaling_markdown, scaling_plot
from pipeline.checkpoint import atomic_write, write_json
from pipeline.data.datasets import prepare
from pipeline.errors import PipelineError
from pipeline.methods import METHODS
from pipeline.models.encoder import build_encoder
from pipeline.models.teacher import FrozenTeacher
from pipeline.train import engine

# sweep name -> (params section, key, values as multiples of the preset's value; None = the values below)
SWEEPS = {
    "img_size": ("data", "img_size", None),
    "patch_size": ("model", "patch_size", None),
    "embed_dim": ("model", "embed_dim", [0.5, 1, 2, 4]),
    "depth": ("model", "depth", [1 / 3, 2 / 3, 1, 2]),
    "batch_size": ("pretrain", "batch_size", [0.25, 0.5, 1, 2, 4]),
}


def sweep_values(params: dict, name: str) -> list[int]:
    """The settings a sweep measures at this preset, the preset's own value among them (ascending, distinct).

    img_size: grids of 3, 5, the preset's, 10/7 and 2 x the preset's grid at the preset's patch size;
    patch_size: the divisors >= 2 of img_size that give 2 x 2 to 16 x 16 patches."""
    section, key, factors = SWEEPS[name]
    base = params[section][key]
    if name == "img_size":
        grid, patch = base // params["model"]["patch_size"], params["model"]["patch_size"]
        values = [g * patch for g in (3, 5, grid, round(grid * 10 / 7), 2 * grid)]
    elif name == "patch_size":
        size = params["data"]["img_size"]
        values = [p for p in range(2, size + 1) if size % p == 0 and 2 <= size // p <= 16] + [base]
    else:
        step = 4 if key == "embed_dim" else 1          # sin-cos positions need widths divisible by 4
        values = [max(step, round(base * f / step) * step) for f in factors]
    return sorted(set(values))


def with_setting(params: dict, name: str, value: int) -> dict:
    section, key, _ = SWEEPS[name]
    out = copy.deepcopy(params)
    out[section][key] = value
    if name == "embed_dim" and value % out["model"]["num_heads"]:
        raise PipelineError(f"embed_dim {value} does not divide by model.num_heads {out['model']['num_heads']}")
    return out


def measure_point(params: dict, precision: str, steps: int, device: str, pool, peak_size: int) -> dict:
    """MAE's step at these params in one precision: the bench measurement plus its FLOPs and MFU."""
    measured = throughput.measure(params, "mae", precision, steps, device, pool, peak_size)
    return {"precision": precision, **throughput.throughput(params, "mae", measured)}


def measure_sweeps(params: dict, names: list[str], precisions: list[str], steps: int, device: str, peak_size: int,
                   progress) -> dict:
    """{sweep name: points}, a point per setting and precision; flop_model_s from the preset's point of the
    same precision."""
    sweeps = {name: [] for name in names}
    with throughput.child_pool() as pool:
        for precision in precisions:
            base = measure_point(params, precision, steps, device, pool, peak_size)
            progress(f"preset point {precision}: step {1000 * base['step_s']:.1f} ms, MFU {100 * base['mfu']:.1f}%")
            for name in names:
                for value in sweep_values(params, name):
                    p = with_setting(params, name, value)
                    point = base if p == params else measure_point(p, precision, steps, device, pool, peak_size)
                    sweeps[name].append({"value": value, "tokens": _tokens(p), **point, "flop_model_s":
                                         base["step_s"] * point["flops_per_step"] / base["flops_per_step"]})
                    progress(f"{name} {value} {precision}: step {1000 * point['step_s']:.1f} ms (FLOP model "
                             f"{1000 * sweeps[name][-1]['flop_model_s']:.1f} ms), MFU {100 * point['mfu']:.1f}%")
    return sweeps


def _tokens(params: dict) -> int:
    return (params["data"]["img_size"] // params["model"]["patch_size"]) ** 2


def dbot_chain(params: dict, stages: int, epochs: int, images: int, device: str, workdir: Path, progress,
               precision: str = "auto") -> list[dict]:
    """Wall seconds of each stage of a dBOT chain trained in this process (stage k's teacher = stage k-1's
    student; stage 0's = a random encoder), and the cumulative wall time after it."""
    data = prepare(params["data"], params["data"]["split_seed"])
    x, d = data.train_x[:images], params["data"]
    cfg = dataclasses.replace(throughput.train_config(params, precision), epochs=epochs, desc="dbot chain")
    student = build_encoder(params["model"], d["img_size"], x.shape[1], seed=1000)    # stage 0's random teacher
    out, total = [], 0.0
    for stage in range(stages):
        start = time.perf_counter()
        teacher = FrozenTeacher(student, params["dbot"]["teacher_final_norm"])
        model = METHODS["dbot"](params, x.shape[1], stage, teacher)
        result = engine.train(model, engine.TrainData(x, data.mean, data.std), cfg,
                              engine.Run(workdir / f"stage{stage}.pt", device=device))
        student = model.encoder
        seconds = time.perf_counter() - start
        total += seconds
        out.append({"stages": stage + 1, "stage_s": seconds, "cumulative_s": total,
                    "final_loss": result.history[-1]["loss"]})
        progress(f"dBOT chain stage {stage}: {seconds:.1f} s, {stage + 1} stages {total:.1f} s")
    return out


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    throughput.add_common_args(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per point (default 10)")
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=list(SWEEPS), metavar="SWEEP",
                        help=f"which sweeps (default all: {' '.join(SWEEPS)})")
    parser.add_argument("--precisions", nargs="+", default=None, choices=throughput.PRECISIONS,
                        help="precisions of every sweep besides fp32 and the default (default: the native ones)")
    parser.add_argument("--chain-stages", type=int, default=4, help="dBOT chain length (default 4; 0 = skip)")
    parser.add_argument("--chain-epochs", type=int, default=1, help="epochs per dBOT stage (default 1)")
    parser.add_argument("--chain-images", type=int, default=1024, help="train images of the chain (default 1024)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.chain_stages < 0 or args.chain_epochs < 1 or args.chain_images < 1:
        parser.error("--steps, --chain-epochs and --chain-images must be >= 1, --chain-stages >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    params, device, n = throughput.setup(args)
    default, precisions, skipped = throughput.plan_precisions(device, args.precisions)
    for precision, why in skipped.items():
        print(f"skipped {precision}: {why}", flush=True)
    for name in args.sweeps:                    # bad settings fail here, before any measurement
        for value in sweep_values(params, name):
            with_setting(params, name, value)
    total = len(precisions) * (1 + sum(len(sweep_values(params, name)) for name in args.sweeps)) + args.chain_stages
    progress = throughput.Progress(total)
    sweeps = measure_sweeps(params, args.sweeps, precisions, args.steps, device, n, progress)
    with tempfile.TemporaryDirectory(prefix="dbot_chain_") as tmp:     # the stages' resumable states
        chain = dbot_chain(params, args.chain_stages, args.chain_epochs, args.chain_images, device, Path(tmp),
                           progress, default.name) if args.chain_stages else []
    result = {"preset": args.preset, "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "precisions": precisions, "skipped_precisions": skipped, "chain_precision": default.name,
              "default_precision_reason": default.reason,
              "steps": args.steps,
              "peak_matmul_size": n, "preset_settings": {name: params[SWEEPS[name][0]][SWEEPS[name][1]]
                                                         for name in SWEEPS},
              "sweeps": sweeps, "dbot_chain": chain,
              "dbot_chain_settings": {"epochs": args.chain_epochs, "images": args.chain_images,
                                      "batch_size": params["pretrain"]["batch_size"]}}
    write_json(args.out / "scaling.json", result)
    atomic_write(args.out / "scaling.md", lambda tmp: tmp.write_text(scaling_markdown(result)))
    scaling_plot(result, args.out / "scaling.png")
    print(json.dumps({"written": [str(args.out / f) for f in ("scaling.json", "scaling.md", "scaling.png")]}))
    return result


if __name__ == "__main__":
    main()
