"""Benchmark (not a test): peak memory vs dataset size, of preparing an image folder and of training on it.

    python -m pipeline.bench.dataset --sizes 1000 4000 16000 [--preset default] [--train-steps 5]
        [--img-size S] [--channels C] [--threads T] [--workdir DIR] [--out results/bench]

For each size N, a synthetic ImageFolder is generated first (seeded: N 32x32 grey PNGs of a noisy class digit
in 10 class folders under --workdir, a temporary folder by default), then one fresh child process (forkserver
where there is one, else spawn; one task per child) measures two phases:

- prepare: datasets.prepare + datasets.save_prepared of the folder (dataset imagefolder, the preset's data section at
  --img-size / --channels, val_fraction 0.2, split_seed 0), as the prepare_data stage runs them;
- train: datasets.load_prepared + --train-steps MAE training steps (pipeline.bench.throughput.train_steps:
  engine.train_step on the batches of engine.batch_indices, the preset's pretrain settings).

A background thread reads /proc/self/status every 5 ms (and once more at each phase end): the peak of RssAnon,
the process's own memory (heap, tensors it allocates), and of RssFile, the pages of mapped files (the
temporary image file, the prepared file) that belong to the page cache, which the kernel writes back and drops
when memory is short. MB = 2^20 bytes. baseline_anon_mb / baseline_file_mb: the child's RssAnon / RssFile
after its imports, before any work (RssFile then holds the mapped shared libraries).

Writes dataset_memory.json (`rows`: one dict per size), dataset_memory.md and dataset_memory.png under --out.
Linux only (/proc).

    python -m pipeline.bench.dataset --stream --folder DIR [--make N] [--img-size 224] [--workers 1 2]
        [--batch-size 64] [--images 10000 40000 160000] [--node-steps 5] [--workdir DIR] [--out results/bench]

The streamed image-folder path (data.format stream, pipeline.data.stream), run from the repository root (params/):
--make N first writes N synthetic JPEGs into DIR (make_jpegs: ~400x350, quality 90, seeded). Measured:
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
import gc
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from pipeline import config, hardware
from pipeline.bench import throughput
from pipeline.checkpoint import atomic_write, write_json
from pipeline.data import datasets
from pipeline.errors import PipelineError
from pipeline.layout import RESULTS
from pipeline.plots import save_png
from pipeline.reporting.tables import markdown_table

CLASSES = 10
GEN_SIZE = 32              # side of the generated PNGs; prepare resizes them to img_size
VAL_FRACTION, SPLIT_SEED = 0.2, 0
STATS_CHUNK = 4096         # images per float64 chunk of datasets.tensor_channel_stats


# ---- the synthetic image folder ------------------------------------------------------------------------

def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """n grey GEN_SIZE x GEN_SIZE PNGs in CLASSES class folders (image i: class i % CLASSES, its digit drawn at a
    seeded offset and brightness, plus Gaussian noise); the same n and seed give the same files."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default(size=24)
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = i % CLASSES
        im = Image.new("L", (GEN_SIZE, GEN_SIZE))
        xy = (int(rng.integers(2, 16)), int(rng.integers(-4, 6)))
        ImageDraw.Draw(im).text(xy, str(label), fill=int(rng.integers(150, 256)), font=font)
        noisy = np.asarray(im, dtype=np.float64) + rng.normal(0, 16, (GEN_SIZE, GEN_SIZE))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / f"class{label}" / f"{i:07d}.png")
    return root


# ---- measuring in the child ------------------------------------------------------------------------------

def rss_mb() -> dict[str, float]:
    """{"anon", "file"}: this process's RssAnon and RssFile now, in MB (Linux /proc/self/status)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        raise PipelineError("bench_dataset reads /proc/self/status: it runs on Linux only") from None
    kb = {k: float(v.split()[0]) for k, v in (line.split(":", 1) for line in status.splitlines() if ":" in line)
          if k in ("RssAnon", "RssFile")}
    return {"anon": kb["RssAnon"] / 1024, "file": kb["RssFile"] / 1024}


class PeakSampler:
    """Samples rss_mb() every `interval` s in a daemon thread; peak() is the maximum since the last reset()."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.lock, self.stopped = interval, threading.Lock(), threading.Event()
        self.reset()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        now = rss_mb()
        with self.lock:
            self.max = {k: max(self.max[k], v) for k, v in now.items()}

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            self._sample()

    def reset(self) -> None:
        with self.lock:
            self.max = rss_mb()

    def peak(self) -> dict[str, float]:
        self._sample()                     # the phase's end counts too
        with self.lock:
            return dict(self.max)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def phase(sampler: PeakSampler, name: str, work) -> tuple[dict, object]:
    """Run work(); {<name>_peak_anon_mb, <name>_peak_file_mb, <name>_s} and its value."""
    sampler.reset()
    start = time.perf_counter()
    value = work()
    seconds = time.perf_counter() - start
    peak = sampler.peak()
    return {f"{name}_peak_anon_mb": peak["anon"], f"{name}_peak_file_mb": peak["file"], f"{name}_s": seconds}, value


def _measure_child(params: dict, out: Path, train_steps: int, threads: int) -> dict:
    """In a fresh process: the prepare and train phases on params' image folder (see the module docstring)."""
    torch.set_num_threads(threads)
    gc.collect()
    sampler = PeakSampler()
    baseline = rss_mb()
    row = {"baseline_anon_mb": baseline["anon"], "baseline_file_mb": baseline["file"]}
    device = hardware.device()

    def prepare() -> dict:
        prep = datasets.prepare(params["data"], SPLIT_SEED, scratch=out.parent)
        return datasets.save_prepared(prep, out, {"node": "bench_dataset"})

    def train() -> None:
        prep = datasets.load_prepared(out)
        cfg = throughput.train_config(params, params["pretrain"]["precision"])
        throughput.train_steps(params, "mae", cfg, device, prep.train_x, prep.mean, prep.std, train_steps)

    measured, meta = phase(sampler, "prepare", prepare)      # the temporary image file is gone after it
    row.update(measured, train_images=meta["counts"]["train"], val_images=meta["counts"]["val"])
    gc.collect()
    row.update(phase(sampler, "train", train)[0], device=device)
    sampler.stop()
    return row


def size_params(preset_params: dict, folder: Path, img_size: int, channels: int) -> dict:
    """The preset's params with its data section on the image folder."""
    d = dict(preset_params["data"], dataset="imagefolder", path=str(folder), img_size=img_size,
             channels=channels, val_fraction=VAL_FRACTION, split_seed=SPLIT_SEED)
    return dict(preset_params, data=d)


def memory_curve(sizes: list[int], img_size: int, channels: int, train_steps: int, workdir: Path,
                 preset_params: dict, threads: int | None = None, progress=print) -> list[dict]:
    """One row per size: images, file_mb, raw_mb (the uint8 pixels), baseline_anon_mb, generate_s and each phase's
    peak anon / file MB and seconds, measured in a fresh child per size; the prepared file is removed after."""
    threads, workdir = threads or torch.get_num_threads(), Path(workdir).resolve()   # the child's cwd may differ
    rows, start, done = [], time.perf_counter(), 0
    with throughput.child_pool() as pool:
        for k, n in enumerate(sizes, 1):
            t0 = time.perf_counter()
            folder = make_folder(workdir / f"images_{n}", n)
            generate_s = time.perf_counter() - t0
            out = workdir / f"prepared_{n}" / "dataset.safetensors"
            params = size_params(preset_params, folder, img_size, channels)
            row = pool.submit(_measure_child, params, out, train_steps, threads).result()
            rows.append({"images": n, "file_mb": out.stat().st_size / 2 ** 20,
                         "raw_mb": n * channels * img_size ** 2 / 2 ** 20, "generate_s": generate_s, **row})
            shutil.rmtree(out.parent)
            done += n
            elapsed = time.perf_counter() - start
            progress(f"[{k}/{len(sizes)}] {size_line(rows[-1])}  ({elapsed:.0f} s, "
                     f"ETA {elapsed / done * (sum(sizes) - done):.0f} s)")
    return rows


# ---- outputs -------------------------------------------------------------------------------------------

def size_line(r: dict) -> str:
    return (f"{r['images']} images ({r['file_mb']:.1f} MB file): prepare {r['prepare_s']:.1f} s, peak anon "
            f"{r['prepare_peak_anon_mb']:.1f} MB; train {r['train_s']:.1f} s, peak anon {r['train_peak_anon_mb']:.1f} "
            f"MB (baseline {r['baseline_anon_mb']:.1f} MB)")


def findings(result: dict) -> str:
    """What grew and what did not between the smallest and the largest size, and why."""
    rows = sorted(result["rows"], key=lambda r: r["images"])
    a, b = rows[0], rows[-1]
    chunk_mb = STATS_CHUNK * result["channels"] * result["img_size"] ** 2 * 8 / 2 ** 20
    grew = lambda lo, hi, key: f"{lo[key]:.1f} -> {hi[key]:.1f} MB ({hi[key] - lo[key]:+.1f})"
    text = (f"From {a['images']} to {b['images']} images ({b['images'] / a['images']:.0f}x; prepared file "
            f"{a['file_mb']:.1f} -> {b['file_mb']:.1f} MB), the peak anonymous memory (the process's own) went "
            f"{grew(a, b, 'prepare_peak_anon_mb')} in prepare and {grew(a, b, 'train_peak_anon_mb')} in training. "
            f"What grows with the images is file-backed: the mapped pages of the temporary image file and of the "
            f"prepared file (RssFile, page cache the kernel writes back and drops under pressure), prepare "
            f"{grew(a, b, 'prepare_peak_file_mb')}, training {grew(a, b, 'train_peak_file_mb')}. In anonymous memory "
            f"only small per-image parts grow: file paths and labels in prepare (8 B a label), the epoch order in "
            f"training (8 B a train image). The mean/std pass (datasets.tensor_channel_stats) holds one float64 chunk "
            f"of at most {STATS_CHUNK} images ({chunk_mb:.0f} MB at {result['img_size']}x{result['img_size']}x"
            f"{result['channels']}): prepare's anonymous peak rises with the train split up to {STATS_CHUNK} "
            f"images and is flat beyond.")
    full = [r for r in rows if r["train_images"] >= STATS_CHUNK]
    if len(full) >= 2:
        c, d = full[0], full[-1]
        text += (f" Between the sizes that fill the chunk, {c['images']} -> {d['images']} images "
                 f"({d['images'] / c['images']:.0f}x), prepare's peak went {grew(c, d, 'prepare_peak_anon_mb')}.")
    return text


def markdown(result: dict) -> str:
    header = ["images", "train / val", "pixels MB", "file MB", "baseline anon / file MB", "prepare peak anon MB",
              "prepare peak file MB", "prepare s", "train peak anon MB", "train peak file MB", "train s"]
    table = markdown_table(header, [
        [r["images"], f"{r['train_images']} / {r['val_images']}", f"{r['raw_mb']:.1f}", f"{r['file_mb']:.1f}",
         f"{r['baseline_anon_mb']:.1f} / {r['baseline_file_mb']:.1f}", f"{r['prepare_peak_anon_mb']:.1f}",
         f"{r['prepare_peak_file_mb']:.1f}", f"{r['prepare_s']:.1f}", f"{r['train_peak_anon_mb']:.1f}",
         f"{r['train_peak_file_mb']:.1f}", f"{r['train_s']:.1f}"] for r in result["rows"]], "r")
    return "\n".join([
        f"# Dataset memory: preset {result['preset']}, {result['img_size']}x{result['img_size']}x{result['channels']} "
        f"images, {result['train_steps']} MAE steps ({result['device']}, {result['threads']} threads, torch "
        f"{result['torch']})", "",
        "Peak RssAnon / RssFile of one fresh process per size (MB = 2^20 bytes), sampled every 5 ms: prepare = "
        "datasets.prepare + save_prepared of a synthetic image folder, train = load_prepared + the MAE steps.", "",
        *table, "", findings(result), ""])


def plot(result: dict, path: Path | str) -> None:
    """Peak anonymous memory of both phases (and the baseline, the prepared file size) against the images."""
    rows = sorted(result["rows"], key=lambda r: r["images"])
    n = [r["images"] for r in rows]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for key, label, style in (("prepare_peak_anon_mb", "prepare: peak RssAnon", "o-"),
                              ("train_peak_anon_mb", "train: peak RssAnon", "s-"),
                              ("baseline_anon_mb", "baseline RssAnon (after imports)", "k:"),
                              ("prepare_peak_file_mb", "prepare: peak RssFile (page cache)", "^--"),
                              ("file_mb", "prepared file size", "x--")):
        ax.plot(n, [r[key] for r in rows], style, label=label)
    ax.set(xscale="log", xlabel="images in the folder", ylabel="MB (2^20 bytes)",
           title=f"Peak memory vs dataset size ({result['img_size']}x{result['img_size']}x{result['channels']}, "
                 f"preset {result['preset']})")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    save_png(fig, path)


# ---- streamed image folders (data.format stream): decode rate, workers, a training node's memory and start-up ----

JPEG_SIZE = (400, 350)     # --make: ImageNet-like sizes, each side varied by up to JPEG_JITTER
JPEG_JITTER = 0.15
JPEG_QUALITY = 90
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


def make_jpegs(root: Path, n: int, seed: int = 0) -> Path:
    """n RGB JPEGs (quality JPEG_QUALITY) of about JPEG_SIZE (each side +-JPEG_JITTER) in CLASSES class folders
    (image i: class i % CLASSES): a smooth random colour field (a 4x4 grid, bicubic), a few filled shapes and Gaussian
    noise, so they decode like photos, not like flat colour. The same n and seed give the same files."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (int(round(s * (1 + rng.uniform(-JPEG_JITTER, JPEG_JITTER)))) for s in JPEG_SIZE)
        field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(field)
        for _ in range(int(rng.integers(3, 8))):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 10, (h, w, 3)).astype(np.float32)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            root / f"class{i % CLASSES}" / f"{i:07d}.jpg", quality=JPEG_QUALITY)
    return root


def image_files(folder: Path) -> list[Path]:
    """The image files (layout.is_image_name) under folder, sorted."""
    from pipeline.layout import is_image_name
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image_name(p.name))


def link_folder(files: list[Path], root: Path, n: int) -> Path:
    """root/<class>/<j>.<ext> for j < n, a hard link (a symbolic one across file systems) to files[j % len(files)],
    in that file's class folder: n distinct paths for the manifest, without writing n images."""
    for j in range(n):
        src = files[j % len(files)]
        dst = root / src.parent.name / f"{j:07d}{src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            os.symlink(src.resolve(), dst)
    return root


def stream_split(folder: Path, img_size: int, crop_scale, workers: int = 0):
    """The train split of folder as the training node streams it (pipeline.data.stream: scan, split_images), RGB."""
    from pipeline.data import stream
    d = {"dataset": "imagefolder", "path": str(folder), "img_size": img_size, "channels": 3,
         "val_fraction": VAL_FRACTION, "format": "stream"}
    man = stream.scan(d, SPLIT_SEED)
    return stream.split_images(man, "train", Path(folder), d, {"workers": workers, "prefetch": 2, "pin": False},
                               crop_scale=tuple(crop_scale), hflip=True)


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
    images.loader = {"workers": workers, "prefetch": 2, "pin": False}
    start = time.perf_counter()
    batches = images.train_batches(batch_size, seed, slice(None), 0, steps)
    n = len(next(batches)[0])
    first = time.perf_counter()
    for x, _ in batches:
        n_last = len(x)
    seconds = time.perf_counter() - first
    rate = (steps - 1) * n_last / seconds if steps > 1 else n / (first - start)
    return {"workers": workers, "images_per_s": rate, "images_per_s_per_worker": rate / max(workers, 1),
            "first_batch_s": first - start, "batches": steps, "batch_size": n}


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:                       # the process ended
        pass
    return out


def _field_kb(path: str, key: str) -> float:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def tree_memory(pid: int) -> dict:
    """{"rss_mb", "pss_mb", "main_rss_mb", "processes"} of pid and all its descendants now (Linux /proc): RSS
    summed over the processes (pages a fork shares counted in each), and PSS (shared pages split between them)."""
    pids, k = [pid], 0
    while k < len(pids):
        pids += _children(pids[k])
        k += 1
    rss = [_field_kb(f"/proc/{p}/status", "VmRSS:") for p in pids]
    pss = sum(_field_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return {"rss_mb": sum(rss) / 1024, "pss_mb": pss / 1024, "main_rss_mb": rss[0] / 1024,
            "processes": sum(1 for r in rss if r > 0)}


def run_sampled(cmd: list[str], cwd: Path, env: dict, interval: float = 0.05, timeout: float = 900) -> dict:
    """Run cmd; {"wall_s", "start", "peak_rss_mb", "peak_pss_mb", "peak_main_rss_mb", "max_processes"}: the peaks of
    tree_memory of its process tree, sampled every `interval` s. A failure raises with the end of its output."""
    import subprocess
    peak = {"rss_mb": 0.0, "pss_mb": 0.0, "main_rss_mb": 0.0, "processes": 0}
    start = time.time()
    with open(cwd / "node.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            now = tree_memory(proc.pid)
            peak = {k: max(peak[k], now[k]) for k in peak}
            if time.time() - start > timeout:
                proc.kill()
            time.sleep(interval)
    wall = time.time() - start
    if proc.returncode != 0:
        raise PipelineError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n"
                            f"{(cwd / 'node.log').read_text()[-3000:]}")
    return {"wall_s": wall, "start": start, "peak_rss_mb": peak["rss_mb"], "peak_pss_mb": peak["pss_mb"],
            "peak_main_rss_mb": peak["main_rss_mb"], "max_processes": peak["processes"]}


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
    repo, workdir = Path(__file__).resolve().parents[1], Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(config.PARAMS_DIR, workdir / "params", dirs_exist_ok=True)    # the node reads params/ in its cwd
    env = {k: v for k, v in os.environ.items() if k not in ("MIM_FORKSERVER", "MIM_STARTUP_MARK")}
    env.update(PYTHONPATH=os.pathsep.join([str(repo), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
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


def stream_machine() -> dict:
    """CPU model, cores, torch's CPU capability, the load average now."""
    import platform

    from pipeline import hardware
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return {"cpu_model": model, "cores": len(os.sched_getaffinity(0)),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": hardware.describe_cpu(hardware.cpu_features()), "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


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


def stream_markdown(result: dict) -> str:
    m, targets = result["machine"], result["targets"]
    mark = lambda ok: "not measured (one folder size)" if ok is None else "met" if ok else "**NOT met**"
    rows = sorted(result["by_images"], key=lambda r: r["images"])
    a, b = rows[0], rows[-1]
    lines = [
        f"# Streamed image folder (data.format stream): {result['img_size']} px, batch {result['batch_size']}", "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, torch.backends.cpu.get_cpu_capability() "
        f"{m['cpu_capability']} ({m['cpu'].split(', ', 1)[-1]}); "
        f"torch {result['torch']}, torchvision {result['torchvision']}; load average before the runs "
        f"{', '.join(f'{x:.2f}' for x in m['load_average'])}.", "",
        f"Images: {result['source']} (mean {result['jpeg']['mean_width']:.0f} x {result['jpeg']['mean_height']:.0f} "
        f"px, {result['jpeg']['mean_kb']:.0f} kB).", "",
        "## Targets", "",
        f"- decode + crop >= {STREAM_TARGETS['images_per_s_per_worker']:.0f} images/s per worker: "
        f"{mark(targets['decode_rate']['met'])} ({result['images_per_s_per_worker']:.0f} images/s)",
        f"- a training node's memory flat in the number of images: {mark(targets['memory_flat']['met'])} "
        f"(peak RSS {a['peak_rss_mb']:.0f} MB at {a['images']} images, {b['peak_rss_mb']:.0f} MB at {b['images']}: "
        f"{100 * targets['memory_flat']['value']:+.1f}%, limit +{100 * STREAM_TARGETS['rss_growth']:.0f}%)",
        f"- start-up independent of the dataset size: {mark(targets['startup_flat']['met'])} "
        f"({a['startup_s']:.1f} s at {a['images']} images, {b['startup_s']:.1f} s at {b['images']}: "
        f"{targets['startup_flat']['value']:+.1f} s, limit +{targets['startup_flat']['target']:.1f} s)", "",
        "## Decoding and DataLoader workers", "",
        "One worker (the train item of pipeline.data.stream in one process at one torch thread, "
        f"{result['decode']['count']} "
        f"images): {result['images_per_s_per_worker']:.0f} images/s read + decode_jpeg + RandomResizedCrop "
        f"{tuple(result['crop_scale'])} + flip; decoding alone {result['decode']['decode_images_per_s']:.0f} images/s.",
        "", f"StreamImages.train_batches (the training step's DataLoader, batch {result['batch_size']}, prefetch 2), "
        "timed from the first batch:", "",
        *markdown_table(["workers", "images/s", "per worker", "first batch s"], [
            [r["workers"], f"{r['images_per_s']:.0f}", f"{r['images_per_s_per_worker']:.0f}",
             f"{r['first_batch_s']:.2f}"]
            for r in result["loader"]], "r"), "",
        "## A training node against the number of images", "",
        "Per folder: prepare_data (the manifest, and the channel mean/std of up to "
        f"{result['stats_images']} images), then "
        f"`python -m pipeline.stages.training.pretrain --method mae` ({result['node']['steps']} steps of a small MAE, "
        f"launch.data_workers {result['node']['data_workers']}), each a fresh process. Start-up: from just before the "
        "process starts to its first training step done (first work: to $MIM_STARTUP_MARK, params validated). "
        "Peak RSS: the node's process tree (the node and its decoding workers, sampled every 50 ms), RSS summed "
        "(pages shared after the fork counted in each process) and PSS (shared pages split).", "",
        *markdown_table(["images", "train", "peak RSS MB", "peak PSS MB", "node RSS MB", "processes", "start-up s",
                         "first work s", "step s", "prepare_data s", "prepare_data peak RSS MB"], [
            [r["images"], r["train_images"], f"{r['peak_rss_mb']:.0f}", f"{r['peak_pss_mb']:.0f}",
             f"{r['main_peak_rss_mb']:.0f}", r["processes"], f"{r['startup_s']:.2f}", f"{r['first_work_s']:.2f}",
             "None" if r["step_s"] is None else f"{r['step_s']:.2f}", f"{r['prepare_s']:.1f}",
             f"{r['prepare_peak_rss_mb']:.0f}"] for r in rows], "r"), ""]
    stats = min(a["train_images"], result["stats_images"])
    sample_mb = stats * 3 * result["img_size"] ** 2 / 2 ** 20
    lines += [f"prepare_data is not a training node: it lists every file (one stat each) and writes the manifest, "
              f"{a['prepare_s']:.1f} -> {b['prepare_s']:.1f} s from {a['images']} to {b['images']} images; its peak "
              f"RSS ({a['prepare_peak_rss_mb']:.0f} -> {b['prepare_peak_rss_mb']:.0f} MB) is flat: the channel "
              f"mean/std pass holds its {stats} sampled images in uint8 ({sample_mb:.0f} MB at {result['img_size']} "
              f"px) and sums them in float64 chunks of at most 512 MiB (datasets.tensor_channel_stats).", ""]
    if result.get("notes"):
        lines += [result["notes"], ""]
    return "\n".join(lines)


def stream_plot(result: dict, path: Path | str) -> None:
    """Throughput against the workers; peak RSS and start-up against the images."""
    fig = Figure(figsize=(13, 3.8))
    ax = fig.add_subplot(1, 3, 1)
    loader = sorted(result["loader"], key=lambda r: r["workers"])
    w = [r["workers"] for r in loader]
    ax.plot(w, [r["images_per_s"] for r in loader], "o-", label="DataLoader (train_batches)")
    ax.plot(w, [result["images_per_s_per_worker"] * k for k in w], "k:", label="workers x one worker's rate")
    ax.axhline(STREAM_TARGETS["images_per_s_per_worker"], color="tab:red", linestyle="--", linewidth=1,
               label="target per worker")
    ax.set(xlabel="decoding workers", ylabel="images/s", title=f"Decode + crop at {result['img_size']} px")
    ax.set_xticks(w)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    rows = sorted(result["by_images"], key=lambda r: r["images"])
    n = [r["images"] for r in rows]
    panels = (("MB (2^20 bytes)", "Training node memory", (("peak_rss_mb", "peak RSS, process tree"),
                                                          ("peak_pss_mb", "peak PSS, process tree"),
                                                          ("main_peak_rss_mb", "peak RSS, node process"))),
              ("seconds", "Start-up", (("startup_s", "pretrain: to the first step done"),
                                       ("first_work_s", "pretrain: to first work"),
                                       ("prepare_s", "prepare_data: in all"))))
    for k, (ylabel, title, curves) in enumerate(panels, 2):
        ax = fig.add_subplot(1, 3, k)
        for (key, label), style in zip(curves, ("o-", "s--", "^:")):
            ax.plot(n, [r[key] for r in rows], style, label=label)
        ax.set(xscale="log", xlabel="images in the folder", ylabel=ylabel, title=title)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def stream_bench(folder: Path, img_size: int, make: int | None, workers: list[int], batch_size: int,
                 decode_count: int, loader_steps: int, sizes: list[int], node_steps: int, workdir: Path,
                 node_workers: int | None = None, seed: int = 0, progress=print) -> dict:
    """The whole stream benchmark (see stream_main); returns the result dict."""
    import torchvision
    machine = stream_machine()
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
    """--stream: stream.json, stream.md and stream.png under --out."""
    img_size = args.img_size or 224
    workers = args.workers or list(range(1, len(os.sched_getaffinity(0)) + 1))
    sizes = args.images or [10000, 40000, 160000]
    with tempfile.TemporaryDirectory(prefix="bench_stream.") as tmp:
        result = stream_bench(args.folder, img_size, args.make, workers, args.batch_size, args.decode_images,
                              args.loader_steps, sizes, args.node_steps, args.workdir or Path(tmp),
                              args.node_workers, args.seed)
    write_json(args.out / "stream.json", result)
    atomic_write(args.out / "stream.md", lambda tmp: tmp.write_text(stream_markdown(result)))
    stream_plot(result, args.out / "stream.png")
    print(json.dumps({"written": [str(args.out / f"stream.{ext}") for ext in ("json", "md", "png")]}))
    return result


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.dataset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000], help="images per folder")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--img-size", type=int, default=None, help="data.img_size (default: the preset's)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None, help="default: the preset's")
    parser.add_argument("--train-steps", type=int, default=5, help="MAE steps of the train phase (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the children (default: torch's)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the folders go (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench", help="output folder (default results/bench)")
    stream = parser.add_argument_group("--stream: a streamed image folder (data.format stream)")
    stream.add_argument("--stream", action="store_true", help="benchmark the stream path instead: stream.{json,md,png}")
    stream.add_argument("--folder", type=Path, default=None, help="the image folder (with --make: written first)")
    stream.add_argument("--make", type=int, default=None, metavar="N",
                        help="first write N synthetic JPEGs into --folder")
    stream.add_argument("--seed", type=int, default=0, help="seed of --make and of the crops (default 0)")
    stream.add_argument("--workers", type=int, nargs="+", default=None, help="DataLoader workers (default 1..cores)")
    stream.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    stream.add_argument("--decode-images", type=int, default=1000, help="images of the one-worker rate (default 1000)")
    stream.add_argument("--loader-steps", type=int, default=30, help="batches per worker count (default 30)")
    stream.add_argument("--images", type=int, nargs="+", default=None,
                        help="folder sizes of the training-node series (links to the files; "
                             "default 10000 40000 160000)")
    stream.add_argument("--node-steps", type=int, default=5, help="training steps of each pretrain node (default 5)")
    stream.add_argument("--node-workers", type=int, default=None,
                        help="launch.data_workers of the nodes (default null)")
    args = parser.parse_args(argv)
    if args.stream:
        if args.folder is None or min(args.images or [2 * CLASSES]) < 2 * CLASSES or args.node_steps < 1 \
                or args.loader_steps < 1 or (args.make is not None and args.make < 1):
            parser.error(f"--stream needs --folder; --images >= {2 * CLASSES}, --node-steps, --loader-steps, "
                         "--make >= 1")
        return args
    if min(args.sizes) < 2 * CLASSES or args.train_steps < 1:
        parser.error(f"--sizes must be >= {2 * CLASSES} (a train and a val image per class), --train-steps >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.stream:
        return stream_main(args)
    params = config.load(args.preset)
    img_size, channels = args.img_size or params["data"]["img_size"], args.channels or params["data"]["channels"]
    threads = args.threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench_dataset.") as tmp:
        rows = memory_curve(args.sizes, img_size, channels, args.train_steps, args.workdir or Path(tmp), params,
                            threads)
    result = {"preset": args.preset, "img_size": img_size, "channels": channels, "train_steps": args.train_steps,
              "device": rows[0]["device"], "threads": threads, "torch": torch.__version__, "rows": rows}
    result["findings"] = findings(result)
    write_json(args.out / "dataset_memory.json", result)
    atomic_write(args.out / "dataset_memory.md", lambda tmp: tmp.write_text(markdown(result)))
    plot(result, args.out / "dataset_memory.png")
    print(json.dumps({"written": [str(args.out / f"dataset_memory.{ext}") for ext in ("json", "md", "png")]}))
    return result


if __name__ == "__main__":
    main()
