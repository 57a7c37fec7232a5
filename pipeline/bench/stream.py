"""Benchmark (not a test): the streamed image-folder path at ImageNet-like image sizes.

    python -m pipeline.bench.stream --folder DIR [--make N] [--img-size 224] [--workers 1 2]
        [--batch-size 64] [--images 10000 40000 160000] [--node-steps 5] [--workdir DIR] [--out results/bench]

The streamed image-folder path (data.format stream, pipeline.data.stream), run from the repository root (params/):
--make N first writes N synthetic JPEGs into DIR (synthetic.make_jpegs: ~400x350, quality 90, seeded). Measured:
- images_per_s_per_worker: the stream's train item (read, decode_jpeg, RandomResizedCrop, flip) in this process at
  one torch thread, as one DataLoader worker runs it; and StreamImages.train_batches (the training step's DataLoader)
  with each number of workers (default 1..cores);
- by_images: per folder size n (n names hard-linked to DIR's files), prepare_data and then the real pretrain node
  (`python -m pipeline.stages.training.pretrain --method mae`, a small MAE, ended after --node-steps steps), each a
  fresh process in its own folder: the peak RSS (and PSS) of the node's process tree (its decoding workers too), its
  start-up (process start to the first training step done) and its first own work ($MIM_STARTUP_MARK).
Writes stream.json, stream.md (with the targets, STREAM_TARGETS, met or not) and stream.png under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import config, hardware
from pipeline.bench import REPOSITORY, render
from pipeline.bench.memory import run_sampled
from pipeline.bench.synthetic import (
    CLASSES,
    JPEG_QUALITY,
    SPLIT_SEED,
    VAL_FRACTION,
    image_files,
    link_folder,
    make_jpegs,
)
from pipeline.checkpoint import atomic_write, write_json
from pipeline.data.steps import batch_indices
from pipeline.errors import PipelineError
from pipeline.layout import RESULTS

STREAM_TARGETS = {"images_per_s_per_worker": 150.0, "rss_growth": 0.10, "startup_growth": 0.20, "startup_slack_s": 1.0}
# the pretrain node of the by_images series: a small MAE at the image size, a few real steps
# (pipeline.stages.training.pretrain)
NODE_SETTINGS = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.decoder_dim=32",
                 "model.decoder_depth=1", "model.decoder_heads=2", "pretrain.precision=fp32", "pretrain.epochs=100",
                 "pretrain.online_knn.every_epochs=0"]
# runs the real pretrain CLI with one hook: pipeline.train.engine.train_step, wrapped when the engine is first imported
# (so the node imports what it imports, in its order), writes time.time() after the first step and after each step to
# $BENCH_STREAM_STEPS, and ends the process (os._exit: workers die with it) after $BENCH_STREAM_MAX_STEPS steps
NODE_RUNNER = r"""
import importlib.abc, importlib.util, os, runpy, sys, time
steps_file, max_steps = os.environ["BENCH_STREAM_STEPS"], int(os.environ["BENCH_STREAM_MAX_STEPS"])

def patch(engine):
    step, times = engine.train_step, []

    def timed(*args, **kwargs):
        out = step(*args, **kwargs)
        times.append(time.time())
        with open(steps_file, "w") as f:
            f.write(" ".join(map(repr, times)))
        if len(times) >= max_steps:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(0)
        return out
    engine.train_step = timed

class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pipeline.train.engine":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        spec.loader.exec_module = lambda module: (run(module), patch(module))[0]
        return spec

sys.meta_path.insert(0, Hook())
sys.argv = ["pipeline.stages.training.pretrain", *sys.argv[1:]]
runpy.run_module("pipeline.stages.training.pretrain", run_name="__main__", alter_sys=True)
"""



def stream_split(folder: Path, img_size: int, crop_scale, workers: int = 0):
    """The train split of folder as the training node streams it (pipeline.data.stream: scan, split_images), RGB."""
    from pipeline.data import stream
    from pipeline.settings import Loader, Stream
    d = {"dataset": "imagefolder", "path": str(folder), "img_size": img_size, "channels": 3,
         "val_fraction": VAL_FRACTION, "format": "stream"}
    man = stream.scan(d, SPLIT_SEED)
    return stream.split_images(man, "train", Stream.folder(d, Loader(workers, 2, False), crop_scale, hflip=True))


def decode_rate(images, count: int, seed: int = 0) -> dict:
    """One worker's rate: the train item (seed, 0, i) of pipeline.data.stream (read, decode_jpeg, RandomResizedCrop,
    flip) for `count` images in this process at one torch thread, as a DataLoader worker runs (after 8 warm-up
    items); and the decoding alone (stream.read_image) of the same images."""
    from pipeline.data import stream
    files, threads = images.files, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        idx = [int(images.index[k % len(images)]) for k in range(count)]
        for i in idx[:8]:
            files[(seed, 0, i)]
        start = time.perf_counter()
        for i in idx:
            files[(seed, 0, i)]
        item_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in idx:
            stream.read_image(os.path.join(files.root, files.paths[i].decode()), int(files.sizes[i]), files.mode)
        decode_s = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"images_per_s_per_worker": count / item_s, "decode_images_per_s": count / decode_s, "count": count}


def loader_rate(images, workers: int, batch_size: int, steps: int, seed: int = 0) -> dict:
    """Images/s of StreamImages.train_batches (the training step's DataLoader: `workers` processes, prefetch 2)
    over `steps` batches, timed from the first batch (the workers' start-up is first_batch_s)."""
    from pipeline.settings import Loader

    images.loader = Loader(workers, 2, False)
    start = time.perf_counter()
    batches = images.train_batches(batch_indices, batch_size, seed, slice(None), 0, steps)
    n = len(next(batches)[0])
    first = time.perf_counter()
    for x, _ in batches:
        n_last = len(x)
    seconds = time.perf_counter() - first
    rate = (steps - 1) * n_last / seconds if steps > 1 else n / (first - start)
    return {"workers": workers, "images_per_s": rate, "images_per_s_per_worker": rate / max(workers, 1),
            "first_batch_s": first - start, "batches": steps, "batch_size": n}



def node_args(folder: Path, img_size: int, batch_size: int, workers: int | None) -> list[str]:
    """--preset tiny --set ... of the streamed training node on folder (RGB at img_size, 16-px patches or 8)."""
    patch = 16 if img_size % 16 == 0 else 8
    sets = ["data.dataset=imagefolder", f"data.path={folder}", "data.format=stream", "data.channels=3",
            f"data.img_size={img_size}", f"data.val_fraction={VAL_FRACTION}", f"model.patch_size={patch}",
            f"pretrain.batch_size={batch_size}", *NODE_SETTINGS,
            f"launch.data_workers={'null' if workers is None else workers}"]
    return ["--preset", "tiny", *(a for s in sets for a in ("--set", s))]


def node_run(folder: Path, workdir: Path, img_size: int, batch_size: int, steps: int, workers: int | None) -> dict:
    """prepare_data (manifest) and then the MAE pretrain node on folder, each a fresh cold process in workdir (its
    own results/, MLflow store and a copy of params/); the pretrain node ends after `steps` training steps
    (NODE_RUNNER). Times from just before each process starts; memory: its process tree (run_sampled)."""
    import sys
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(config.PARAMS_DIR, workdir / "params", dirs_exist_ok=True)    # the node reads params/ in its cwd
    env = {k: v for k, v in os.environ.items() if k not in ("MIM_FORKSERVER", "MIM_STARTUP_MARK")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPOSITORY), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               MLFLOW_TRACKING_URI=f"sqlite:///{workdir}/mlflow.db",
               MIM_STARTUP_MARK=str(workdir / "startup.mark"), BENCH_STREAM_STEPS=str(workdir / "steps.txt"),
               BENCH_STREAM_MAX_STEPS=str(steps))
    args = node_args(Path(folder).resolve(), img_size, batch_size, workers)
    prep = run_sampled([sys.executable, "-m", "pipeline.stages.training.prepare_data", *args], workdir, env)
    mark = float((workdir / "startup.mark").read_text())
    (workdir / "startup.mark").unlink()
    meta = json.loads((workdir / "results/prepare_data/manifest.json").read_text())
    train = run_sampled([sys.executable, "-c", NODE_RUNNER, *args, "--method", "mae"], workdir, env)
    times = [float(t) for t in (workdir / "steps.txt").read_text().split()]
    if len(times) < steps:
        raise PipelineError(f"the pretrain node ended after {len(times)} of {steps} steps:\n"
                            f"{(workdir / 'node.log').read_text()[-3000:]}")
    gaps = np.diff(times)
    return {"train_images": meta["counts"]["train"], "val_images": meta["counts"]["val"],
            "prepare_s": prep["wall_s"], "prepare_first_work_s": mark - prep["start"],
            "prepare_peak_rss_mb": prep["peak_rss_mb"],
            "first_work_s": float((workdir / "startup.mark").read_text()) - train["start"],
            "startup_s": times[0] - train["start"], "step_s": float(np.median(gaps)) if len(gaps) else None,
            "peak_rss_mb": train["peak_rss_mb"], "peak_pss_mb": train["peak_pss_mb"],
            "main_peak_rss_mb": train["peak_main_rss_mb"], "processes": train["max_processes"], "steps": steps}


def stream_targets(result: dict) -> dict:
    """Each target (STREAM_TARGETS) of the stream benchmark -> {"met", "value", "target", "what"}, from the numbers
    (the two flatness targets compare the smallest and the largest folder: "met" None with one size)."""
    t = STREAM_TARGETS
    rows = sorted(result["by_images"], key=lambda r: r["images"])
    a, b = rows[0], rows[-1]
    rss_growth = b["peak_rss_mb"] / a["peak_rss_mb"] - 1
    limit = max(t["startup_growth"] * a["startup_s"], t["startup_slack_s"])
    rate = result["images_per_s_per_worker"]
    return {
        "decode_rate": {"met": rate >= t["images_per_s_per_worker"], "value": rate,
                        "target": t["images_per_s_per_worker"],
                        "what": f">= {t['images_per_s_per_worker']:.0f} images/s per worker at "
                                f"{result['img_size']} px (decode + RandomResizedCrop + flip, one thread)"},
        "memory_flat": {"met": rss_growth <= t["rss_growth"] if len(rows) > 1 else None, "value": rss_growth,
                        "target": t["rss_growth"],
                        "what": f"a training node's peak RSS (its process tree) flat in the number of images: "
                                f"at most +{100 * t['rss_growth']:.0f}% from {a['images']} to {b['images']} images"},
        "startup_flat": {"met": b["startup_s"] - a["startup_s"] <= limit if len(rows) > 1 else None,
                         "value": b["startup_s"] - a["startup_s"], "target": limit,
                         "what": f"start-up (process start to the first training step done) independent of the "
                                 f"dataset size: at most +{limit:.1f} s from {a['images']} to {b['images']} images "
                                 f"(the larger of {100 * t['startup_growth']:.0f}% and {t['startup_slack_s']:.0f} s)"},
    }


def stream_bench(folder: Path, img_size: int, make: int | None, workers: list[int], batch_size: int,
                 decode_count: int, loader_steps: int, sizes: list[int], node_steps: int, workdir: Path,
                 node_workers: int | None = None, seed: int = 0, progress=print) -> dict:
    """The whole stream benchmark (see stream_main); returns the result dict."""
    import torchvision
    machine = hardware.describe_machine()
    t0 = time.perf_counter()
    if make:
        make_jpegs(Path(folder), make, seed)
        progress(f"made {make} JPEGs in {folder} ({time.perf_counter() - t0:.0f} s)")
    files = image_files(folder)
    if not files:
        raise PipelineError(f"no image files under {folder}")
    sample = files[:: max(1, len(files) // 200)]
    from PIL import Image
    dims = [Image.open(f).size for f in sample]
    jpeg = {"files": len(files), "mean_width": float(np.mean([d[0] for d in dims])),
            "mean_height": float(np.mean([d[1] for d in dims])),
            "mean_kb": float(np.mean([f.stat().st_size for f in sample]) / 1024)}
    crop_scale = config.load("default")["pretrain"]["crop_scale"]
    images = stream_split(Path(folder), img_size, crop_scale)
    decode = decode_rate(images, decode_count, seed)
    progress(f"one worker: {decode['images_per_s_per_worker']:.0f} images/s (decoding alone "
             f"{decode['decode_images_per_s']:.0f})")
    loader = []
    for k in workers:
        loader.append(loader_rate(images, k, batch_size, loader_steps, seed))
        progress(f"{k} worker(s): {loader[-1]['images_per_s']:.0f} images/s")
    by_images = []
    for n in sizes:
        linked = link_folder(files, Path(workdir) / f"images_{n}", n)
        row = {"images": n, **node_run(linked, Path(workdir) / f"node_{n}", img_size, batch_size, node_steps,
                                       node_workers)}
        by_images.append(row)
        progress(f"{n} images: peak RSS {row['peak_rss_mb']:.0f} MB (PSS {row['peak_pss_mb']:.0f}), start-up "
                 f"{row['startup_s']:.1f} s, prepare_data {row['prepare_s']:.1f} s")
        shutil.rmtree(linked)
    from pipeline.data import stream
    result = {"machine": machine, "torch": torch.__version__, "torchvision": torchvision.__version__,
              "img_size": img_size, "batch_size": batch_size, "crop_scale": list(crop_scale), "jpeg": jpeg,
              "source": (f"{make} synthetic JPEGs (--make, seed {seed}, quality {JPEG_QUALITY})" if make
                         else f"{len(files)} images in {folder}"),
              "images_per_s_per_worker": decode["images_per_s_per_worker"], "decode": decode,
              "workers": list(workers), "loader": loader, "stats_images": stream.STATS_IMAGES,
              "node": {"preset": "tiny", "settings": NODE_SETTINGS, "steps": node_steps,
                       "data_workers": "null (min(8, cores - 1))" if node_workers is None else node_workers},
              "by_images": by_images,
              "notes": (f"The folders of the by_images series are {len(files)} image files under more names (hard "
                        "links, distinct paths in the manifest); the page cache holds each file once, which is "
                        "not the node's memory either way.") if any(n > len(files) for n in sizes) else "",
              "seconds": time.perf_counter() - t0}
    result["targets"] = stream_targets(result)
    return result


def stream_main(args) -> dict:
    """stream.json, stream.md and stream.png under --out."""
    img_size = args.img_size or 224
    workers = args.workers or list(range(1, len(os.sched_getaffinity(0)) + 1))
    sizes = args.images or [10000, 40000, 160000]
    with tempfile.TemporaryDirectory(prefix="bench_stream.") as tmp:
        result = stream_bench(args.folder, img_size, args.make, workers, args.batch_size, args.decode_images,
                              args.loader_steps, sizes, args.node_steps, args.workdir or Path(tmp),
                              args.node_workers, args.seed)
    write_json(args.out / "stream.json", result)
    atomic_write(args.out / "stream.md", lambda tmp: tmp.write_text(render.stream_markdown(result)))
    render.stream_plot(result, args.out / "stream.png")
    print(json.dumps({"written": [str(args.out / f"stream.{ext}") for ext in ("json", "md", "png")]}))
    return result




def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=224, help="data.img_size (default 224)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the nodes run (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench", help="output folder (default results/bench)")
    parser.add_argument("--folder", type=Path, default=None, help="the image folder (with --make: written first)")
    parser.add_argument("--make", type=int, default=None, metavar="N",
                        help="first write N synthetic JPEGs into --folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of --make and of the crops (default 0)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="DataLoader workers (default 1..cores)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--decode-images", type=int, default=1000, help="images of the one-worker rate (default 1000)")
    parser.add_argument("--loader-steps", type=int, default=30, help="batches per worker count (default 30)")
    parser.add_argument("--images", type=int, nargs="+", default=None,
                        help="folder sizes of the training-node series (links to the files; "
                             "default 10000 40000 160000)")
    parser.add_argument("--node-steps", type=int, default=5, help="training steps of each pretrain node (default 5)")
    parser.add_argument("--node-workers", type=int, default=None,
                        help="launch.data_workers of the nodes (default null)")
    args = parser.parse_args(argv)
    if args.folder is None or min(args.images or [2 * CLASSES]) < 2 * CLASSES or args.node_steps < 1 \
            or args.loader_steps < 1 or (args.make is not None and args.make < 1):
        parser.error(f"--folder is required; --images >= {2 * CLASSES}, --node-steps, --loader-steps, --make >= 1")
    return args


def main(argv=None) -> dict:
    return stream_main(parse_args(argv))


if __name__ == "__main__":
    main()
