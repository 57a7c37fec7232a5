"""Benchmark (not a test): training throughput of each method at a preset, fp32 and bf16 autocast.

    python -m pipeline.bench --preset default [--steps 20]

Times the real training step (augmentation, masking, forward, backward, AdamW) on random uint8 images of
the preset's shape, after warm-up steps, and prints images/s per method and precision, each method's
step-time ratio to MAE and its analytic FLOP ratio (student forward+backward = 3x forward, teacher
forward only). Writes results/bench/bench.json.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline import config, engine
from pipeline.checkpoint import write_json
from pipeline.compute import flops_per_image
from pipeline.encoder import build_encoder
from pipeline.layout import RESULTS
from pipeline.methods import METHODS, NEEDS_LABELS, NEEDS_TEACHER
from pipeline.teacher import FrozenTeacher


def step_flops(params: dict, method: str) -> float:
    return flops_per_image(params, method)["train"]


def time_method(params: dict, method: str, bf16: bool, steps: int, warmup: int = 3) -> float:
    """Seconds per training step of `method` (median of `steps` timed steps)."""
    d, t = params["data"], params["pretrain"]
    teacher = None
    if method in NEEDS_TEACHER:
        teacher = FrozenTeacher(build_encoder(params["model"], d["img_size"], d["channels"], seed=1))
    labels = {"num_classes": 10} if method in NEEDS_LABELS else {}
    model = METHODS[method](params, d["channels"], 0, teacher, **labels).train()
    cfg = engine.TrainConfig(epochs=1, batch_size=t["batch_size"], lr=1e-4, min_lr=0, warmup_epochs=0,
                             weight_decay=0.05, clip_grad=t["clip_grad"], bf16=bf16, crop_scale=t["crop_scale"],
                             hflip=t["hflip"], checkpoint_every_min=1e9, seed=0, config_hash="bench")
    opt = torch.optim.AdamW(engine.param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    if hasattr(model, "start_schedule"):
        model.start_schedule(warmup + steps, warmup + steps)     # one epoch: EMA updates as in training
    images = torch.randint(0, 256, (t["batch_size"], d["channels"], d["img_size"], d["img_size"]), dtype=torch.uint8)
    batch_labels = {"labels": torch.arange(t["batch_size"]) % 10} if method in NEEDS_LABELS else {}
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        engine._step(model, opt, images, [0.5] * d["channels"], [0.25] * d["channels"], cfg, 1e-4, i, "cpu",
                     batch_labels)
        times.append(time.perf_counter() - start)
    return sorted(times[warmup:])[steps // 2]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    args = parser.parse_args(argv)
    params = config.load(args.preset)
    batch = params["pretrain"]["batch_size"]
    rows = []
    for bf16 in (False, True):
        mae_step = None
        for method in METHODS:
            step = time_method(params, method, bf16, args.steps)
            mae_step = step if method == "mae" else mae_step
            rows.append({"method": method, "precision": "bf16" if bf16 else "fp32", "step_s": step,
                         "images_per_s": batch / step, "step_ratio_to_mae": step / mae_step,
                         "flop_ratio_to_mae": step_flops(params, method) / step_flops(params, "mae"),
                         "gflops_per_s": step_flops(params, method) * batch / step / 1e9})
            print(f"{method:10s} {rows[-1]['precision']}: {rows[-1]['images_per_s']:8.1f} img/s  "
                  f"step {1000 * step:7.1f} ms  ratio to mae {rows[-1]['step_ratio_to_mae']:.2f} "
                  f"(FLOPs {rows[-1]['flop_ratio_to_mae']:.2f})  {rows[-1]['gflops_per_s']:.1f} GFLOP/s", flush=True)
    out = RESULTS / "bench" / "bench.json"
    result = {"preset": args.preset, "batch_size": batch, "threads": torch.get_num_threads(), "rows": rows}
    write_json(out, result)
    print(json.dumps({"written": str(out)}))
    return result


if __name__ == "__main__":
    main()
