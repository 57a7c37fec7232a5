"""Benchmark (not a test): peak memory vs dataset size, of preparing an image folder and of training on it.

    python -m pipeline.bench.dataset --sizes 1000 4000 16000 [--preset default] [--train-steps 5]
        [--img-size S] [--channels C] [--threads T] [--workdir DIR] [--out results/bench]

For each size N, a synthetic ImageFolder is generated first (seeded: N 32x32 grey PNGs of a noisy class digit
in 10 class folders under --workdir, a temporary folder by default), then one fresh child process (forkserver
where there is one, else spawn; one task per child) measures two phases:

- prepare: datasets.prepare + datasets.save_prepared of the folder (dataset imagefolder, the preset's data section at
  --img-size / --channels, val_fraction 0.2, split_seed 0), as the prepare_data stage runs them;
- train: datasets.load_prepared + --train-steps MAE training steps (pipeline.bench.throughput.train_steps:
  engine.train_step on the batches of steps.batch_indices, the preset's pretrain settings).

A background thread reads /proc/self/status every 5 ms (and once more at each phase end): the peak of RssAnon,
the process's own memory (heap, tensors it allocates), and of RssFile, the pages of mapped files (the
temporary image file, the prepared file) that belong to the page cache, which the kernel writes back and drops
when memory is short. MB = 2^20 bytes. baseline_anon_mb / baseline_file_mb: the child's RssAnon / RssFile
after its imports, before any work (RssFile then holds the mapped shared libraries).

Writes dataset_memory.json (`rows`: one dict per size), dataset_memory.md and dataset_memory.png under --out.
Linux only (/proc).

The streamed path (data.format stream) has its own benchmark: pipeline.bench.stream.
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from pipeline import config, hardware
from pipeline.bench import throughput
from pipeline.bench.memory import PeakSampler, phase, rss_mb
from pipeline.bench.synthetic import CLASSES, SPLIT_SEED, VAL_FRACTION, make_folder
from pipeline.checkpoint import atomic_write, write_json
from pipeline.data import datasets
from pipeline.layout import RESULTS
from pipeline.plots import save_png
from pipeline.reporting.tables import markdown_table

STATS_CHUNK = 4096         # images per float64 chunk of datasets.tensor_channel_stats


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
    args = parser.parse_args(argv)
    if min(args.sizes) < 2 * CLASSES or args.train_steps < 1:
        parser.error(f"--sizes must be >= {2 * CLASSES} (a train and a val image per class), --train-steps >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
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
