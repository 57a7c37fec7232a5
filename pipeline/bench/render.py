"""Rendering of the benchmarks' results: pipeline.bench.throughput's progress lines, the tables of bench.md and the loss
curves of the modes (modes_loss.png); pipeline.bench.scaling's scaling.md and scaling.png; pipeline.bench.stream's
stream.md and stream.png. Figures are drawn on matplotlib's Agg canvas by pipeline.plots.save_png.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

from pipeline.bench.breakdown import PARTS
from pipeline.checkpoint import atomic_write
from pipeline.plots import save_png
from pipeline.reporting.tables import markdown_table

MODE_STYLE = {"fp32": ("tab:blue", "-"), "bf16": ("tab:orange", "--"), "fp16": ("tab:purple", "-."),
              "compile": ("tab:green", ":")}


def row_line(r: dict) -> str:
    return (f"{r['method']:10s} {_precision(r)}: {r['images_per_s']:8.1f} img/s  step {1000 * r['step_s']:7.1f} ms  "
            f"{r['gflops_per_s']:7.1f} GFLOP/s  MFU {100 * r['mfu']:5.2f}%  peak {r['peak_mem_mb']:7.1f} MB  "
            f"ratio to mae {r['step_ratio_to_mae']:.2f}, at equal peak {r['step_ratio_at_equal_peak']:.2f} "
            f"(FLOPs {r['flop_ratio_to_mae']:.2f})")


def _precision(r: dict) -> str:
    """A row's precision, marked when it is the default (measured through `precision: auto`)."""
    return f"{r['precision']} (auto)" if r.get("setting") == "auto" else r["precision"]


def _mode_name(mode: str, run: dict) -> str:
    return f"{mode} ({', '.join(v for v in (run['precision'], run.get('backend')) if v)})"


def mode_line(mode: str, run: dict) -> str:
    if "error" in run:
        return f"mode {_mode_name(mode, run)}: failed: {run['error'].splitlines()[0][:200]}"
    return (f"mode {_mode_name(mode, run)}: step {1000 * run['step_s']:.1f} ms, first step "
            f"{1000 * run['first_step_s']:.0f} ms, final loss {run['final_loss']:.4f} "
            f"({run['final_loss_diff_to_fp32']:+.2e} vs fp32)")


def _kernel_ms(timing: dict) -> str:
    if "error" in timing:
        return "n/a"
    return f"{1000 * timing['forward_s']:.2f} + {1000 * timing['backward_s']:.2f}"


def attention_line(a: dict) -> str:
    return (f"attention {a['precision']} {a['call']} {tuple(a['shape'])}: "
            + ", ".join(f"{k} {_kernel_ms(t)} ms" for k, t in a["kernels"].items()) + f"; runs {a['chosen']}")


def max_batch_line(m: dict) -> str:
    if m["batch_size"] is None:
        return f"largest batch {m['method']} {m['precision']}: none fits (from {m['failed_at']})"
    return (f"largest batch {m['method']} {m['precision']}: {m['batch_size']} ({m['peak_mem_mb']:.0f} MB, "
            f"{m['images_per_s']:.1f} img/s; {m['failed_at'] or 'no limit reached'} did not fit)")


def _max_batch_table(largest: list[dict]) -> list[str]:
    if not largest:
        return []
    rows = [[m["method"], m["precision"], m["batch_size"] or "none", f"{m['peak_mem_mb'] or 0:.0f}",
             f"{m['images_per_s'] or 0:.1f}", m["failed_at"] or ""] for m in largest]
    return ["## Largest per-device batch that fits (doubling from 8)", "",
            *markdown_table(["method", "precision", "batch", "peak MB", "img/s", "first batch that did not fit"],
                            rows, "llr"), ""]


def loading_line(loading: dict) -> str:
    return (f"data loading: {loading['images_per_s']:.0f} img/s = {loading['ratio_to_mae_training']:.1f} x "
            f"MAE training ({loading['mae_precision']})")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:200]


def _rows_table(rows: list[dict]) -> list[str]:
    header = ["method", "precision", "img/s", "step ms", "GFLOP/s", "matmul peak here", "MFU %", "peak MB",
              "step ratio", "step ratio at equal peak", "FLOP ratio"]
    return markdown_table(header, [[r["method"], _precision(r), f"{r['images_per_s']:.1f}", f"{1000 * r['step_s']:.1f}",
                                    f"{r['gflops_per_s']:.1f}", f"{r['peak_gflops_here']:.1f}", f"{100 * r['mfu']:.2f}",
                                    f"{r['peak_mem_mb']:.1f}", f"{r['step_ratio_to_mae']:.2f}",
                                    f"{r['step_ratio_at_equal_peak']:.2f}", f"{r['flop_ratio_to_mae']:.2f}"]
                                   for r in rows], "llr")


def _breakdown_table(rows: list[dict]) -> list[str]:
    """Per row with a breakdown: the profiled step's time and each part's share of it."""
    rows = [r for r in rows if "breakdown" in r]
    if not rows:
        return []
    head = ["method", "precision", "profiled step ms", *(f"{p.replace('_', ' ')} %" for p in PARTS)]
    table = markdown_table(head, [[r["method"], _precision(r), f"{1000 * r['breakdown']['profiled_s']:.0f}",
                                   *(f"{100 * r['breakdown'][p]:.1f}" for p in PARTS)] for r in rows], "llr")
    return ["## Step breakdown (one more step under the torch profiler: each op's own time, "
            "pipeline.bench.breakdown)", "", *table, ""]


def _attention_table(attention: list[dict]) -> list[str]:
    """Per precision and attention call of an MAE step: each kernel's forward + backward ms and the one run."""
    if not attention:
        return []
    kernels = list(dict.fromkeys(k for a in attention for k in a["kernels"]))
    rows = [[a["precision"], a["call"], " x ".join(map(str, a["shape"])),
             *(_kernel_ms(a["kernels"][k]) for k in kernels), a["chosen"]] for a in attention]
    return ["## Attention kernels: forward + backward ms of one call (batch x heads x queries x keys x head dim; "
            "n/a: no such kernel here)", "",
            *markdown_table(["precision", "call", "shape", *kernels, "pipeline runs"], rows, "lll"), ""]


def _modes_table(modes: dict) -> list[str]:
    rows = []
    for mode, run in modes.items():
        if "error" in run:
            rows.append([_mode_name(mode, run), f"failed: {_cell(run['error'])}", "", "", ""])
        else:
            rows.append([_mode_name(mode, run), f"{1000 * run['step_s']:.1f}", f"{1000 * run['first_step_s']:.0f}",
                         f"{run['final_loss']:.4f}", f"{run['final_loss_diff_to_fp32']:+.2e}"])
    return markdown_table(["mode (precision)", "step ms", "first step ms", "final loss", "final loss - fp32"], rows,
                          "lr")


def _default_lines(result: dict) -> list[str]:
    """What `precision: auto` chose here, what was skipped, and the default against the fastest per method."""
    ratios = result["default_vs_fastest"]
    lines = [f"Default precision (`precision: auto`): **{result['default_precision']}**: "
             f"{result['default_precision_reason']}.", ""]
    lines += [f"Skipped {p}: {why}." for p, why in result["skipped_precisions"].items()]
    return lines + ["", "Default images/s / the fastest measured precision's, per method (target >= 0.95): "
                    + ", ".join(f"{m} {v:.2f}" for m, v in ratios.items())
                    + (" (met)" if result["default_meets_target"] else " (**missed**)"), ""]


def markdown(result: dict) -> str:
    """bench.md: the default precision, the rows table, the modes table, the data-loading line and the peaks."""
    peaks, m = result["peak_gflops"], result["model"]
    modes = ([f"## Modes: MAE, {result['curve_steps']} steps on the real train images (same init and batches)", "",
              *_modes_table(result["modes"]), "",
              loading_line(result["data_loading"]) + " (batches made as engine.train_step makes them)", ""]
             if result["modes"] is not None else [f"Data loading and modes skipped: {result['modes_skipped']}.", ""])
    load = result["machine"]["load_average"]
    return "\n".join([
        f"# Benchmark: preset {result['preset']} ({result['device']}: {result['device_name']}, {result['cpu']}, "
        f"{result['threads']} threads, batch {result['batch_size']}, median of {result['steps']} steps, "
        f"torch {result['torch']})", "",
        f"Model: {m['arch']}, {result['img_size']} px, patch {m['patch_size']}, encoder {m['depth']} x "
        f"{m['embed_dim']}, decoder {m['decoder_depth']} x {m['decoder_dim']}. Load average at the end "
        f"(1, 5, 15 min): {', '.join(map(str, load))} on {result['machine']['cores']} cores.", "",
        *_default_lines(result),
        *_rows_table(result["rows"]), "",
        *_breakdown_table(result["rows"]),
        *_attention_table(result["attention"]),
        *_max_batch_table(result["max_batch"]),
        *modes,
        f"Matmul peak (n = {result['peak_matmul_size']}) at the start: "
        + ", ".join(f"{p} {v:.1f} GFLOP/s" for p, v in peaks.items())
        + ". MFU = GFLOP/s / the matmul peak of the row's precision measured in the row's own process between its "
        "steps (\"matmul peak here\").", ""])


def write_markdown(result: dict, path: Path | str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(markdown(result)))


def modes_loss(modes: dict, path: Path | str) -> None:
    """The loss curve of every mode that ran, overlaid; a failed mode is named with its error."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for mode, run in modes.items():
        if "losses" in run:
            color, style = MODE_STYLE.get(mode, ("black", "-"))
            ax.plot(range(1, len(run["losses"]) + 1), run["losses"], color=color, linestyle=style,
                    label=_mode_name(mode, run))
    failed = [f"{mode} failed: {run['error'].splitlines()[0][:80]}" for mode, run in modes.items() if "error" in run]
    if failed:
        ax.text(0.02, 0.02, "\n".join(failed), transform=ax.transAxes, fontsize=7, color="tab:red")
    ax.set(xlabel="step", ylabel="training loss", title="MAE: measured precisions and torch.compile, same batches")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    save_png(fig, path)


# ---- the scaling benchmark (pipeline.bench.scaling) -----------------------------------------------------

SWEEP_LABELS = {"img_size": "image size (px), patch fixed", "patch_size": "patch size (px), image fixed",
                "embed_dim": "encoder width", "depth": "encoder depth", "batch_size": "batch size"}


def _sweep_order(result: dict) -> list[str]:
    """The sweeps in SWEEP_LABELS's order (a JSON round trip sorts them)."""
    return [n for n in SWEEP_LABELS if n in result["sweeps"]] + sorted(set(result["sweeps"]) - set(SWEEP_LABELS))


def _speedup(points: list[dict], p: dict) -> str:
    """fp32 step time / this point's step time at the same setting ('' for fp32 rows)."""
    fp32 = [q for q in points if q["value"] == p["value"] and q["precision"] == "fp32"]
    return f"{fp32[0]['step_s'] / p['step_s']:.2f}" if p["precision"] != "fp32" and fp32 else ""


def scaling_markdown(result: dict) -> str:
    """scaling.md: one table per sweep (the preset's rows in bold) and the dBOT chain's table."""
    lines = [f"# Scaling: MAE's training step at preset {result['preset']} with one setting changed "
             f"({result['device']}, {result['threads']} threads, median of {result['steps']} steps)", "",
             "FLOP model = the preset's step time (same precision) x this point's FLOPs / the preset's FLOPs. MFU "
             f"against the matmul peak (n = {result['peak_matmul_size']}) of the row's precision, measured in the "
             "row's own process between its steps. Speed-up vs fp32 = the fp32 step time / the point's step time "
             "at the same setting.", ""]
    for name in _sweep_order(result):
        points, base = result["sweeps"][name], result["preset_settings"][name]
        rows = [[f"**{p['value']}**" if p["value"] == base else str(p["value"]), p["precision"], p["tokens"],
                 f"{p['flops_per_step'] / 1e9:.2f}", f"{1000 * p['step_s']:.1f}", f"{1000 * p['flop_model_s']:.1f}",
                 f"{p['images_per_s']:.1f}", f"{100 * p['mfu']:.1f}", f"{p['peak_mem_mb']:.1f}", _speedup(points, p)]
                for p in sorted(points, key=lambda q: (q["value"], q["precision"]))]
        lines += [f"## {SWEEP_LABELS.get(name, name)}", "",
                  *markdown_table([name, "precision", "patches", "GFLOP/step", "step ms", "FLOP model ms", "img/s",
                                   "MFU %", "peak MB", "speed-up vs fp32"], rows, "rlr"), ""]
    if result["dbot_chain"]:
        c = result["dbot_chain_settings"]
        lines += [f"## dBOT chain: stages trained one after another ({c['epochs']} epoch(s) each on {c['images']} "
                  f"images, batch {c['batch_size']}, {result['chain_precision']})", "",
                  *markdown_table(["stages", "this stage s", "chain total s", "final loss"],
                                  [[s["stages"], f"{s['stage_s']:.1f}", f"{s['cumulative_s']:.1f}",
                                    f"{s['final_loss']:.4f}"] for s in result["dbot_chain"]], "r")]
        lines.append("")
    return "\n".join(lines)


def scaling_plot(result: dict, path: Path | str) -> None:
    """scaling.png: step time (measured, and the FLOP model) against each sweep's setting, log-log, one line per
    precision, and the dBOT chain's cumulative wall time against its number of stages."""
    panels = _sweep_order(result) + (["dbot_chain"] if result["dbot_chain"] else [])
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
    for i, name in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        if name == "dbot_chain":
            chain = result["dbot_chain"]
            per_stage = statistics.median(s["stage_s"] for s in chain)
            ax.plot([s["stages"] for s in chain], [s["cumulative_s"] for s in chain], "o-", label="measured")
            ax.plot([s["stages"] for s in chain], [s["stages"] * per_stage for s in chain], "k:",
                    label="stages x median stage")
            ax.set(xlabel="dBOT stages", ylabel="chain wall time (s)", title="dBOT chain")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            _sweep_panel(ax, name, result)
        ax.legend(fontsize=7)
    fig.suptitle(f"MAE step scaling, preset {result['preset']} ({result['device']}); point labels: MFU", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def _sweep_panel(ax, name: str, result: dict) -> None:
    base, tokens = result["preset_settings"][name], name in ("img_size", "patch_size")
    xs = set()
    for precision in result["precisions"]:
        points = sorted((p for p in result["sweeps"][name] if p["precision"] == precision), key=lambda p: p["value"])
        x = [p["tokens"] if tokens else p["value"] for p in points]
        xs.update(x)
        color = MODE_STYLE.get(precision, ("black", "-"))[0]
        ax.loglog(x, [1000 * p["step_s"] for p in points], "o-", color=color, label=f"{precision} measured")
        ax.loglog(x, [1000 * p["flop_model_s"] for p in points], ":", color=color, label=f"{precision} FLOP model")
        ax.loglog([xv for xv, p in zip(x, points) if p["value"] == base],
                  [1000 * p["step_s"] for p in points if p["value"] == base], "r*", markersize=11)
        for xv, p in zip(x, points):
            ax.annotate(f"{100 * p['mfu']:.0f}%", (xv, 1000 * p["step_s"]), fontsize=6, color=color,
                        textcoords="offset points", xytext=(3, -9))
    ax.set_xticks(sorted(xs), [str(v) for v in sorted(xs)])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set(xlabel="patches per image" if tokens else SWEEP_LABELS.get(name, name), ylabel="step time (ms)",
           title=SWEEP_LABELS.get(name, name) + " (red star: preset)")


def stream_markdown(result: dict) -> str:
    """stream.md: pipeline.bench.stream's result, its targets met or not, its tables."""
    m, targets = result["machine"], result["targets"]
    mark = lambda ok: "not measured (one folder size)" if ok is None else "met" if ok else "**NOT met**"
    rows = sorted(result["by_images"], key=lambda r: r["images"])
    a, b = rows[0], rows[-1]
    lines = [
        f"# Streamed image folder (data.format stream): {result['img_size']} px, batch {result['batch_size']}", "",
        f"Machine: {m['model']}, {m['cores']} cores, torch.backends.cpu.get_cpu_capability() "
        f"{m['cpu_capability']} ({m['cpu'].split(', ', 1)[-1]}); "
        f"torch {result['torch']}, torchvision {result['torchvision']}; load average before the runs "
        f"{', '.join(f'{x:.2f}' for x in m['load_average'])}.", "",
        f"Images: {result['source']} (mean {result['jpeg']['mean_width']:.0f} x {result['jpeg']['mean_height']:.0f} "
        f"px, {result['jpeg']['mean_kb']:.0f} kB).", "",
        "## Targets", "",
        f"- decode + crop >= {targets['decode_rate']['target']:.0f} images/s per worker: "
        f"{mark(targets['decode_rate']['met'])} ({result['images_per_s_per_worker']:.0f} images/s)",
        f"- a training node's memory flat in the number of images: {mark(targets['memory_flat']['met'])} "
        f"(peak RSS {a['peak_rss_mb']:.0f} MB at {a['images']} images, {b['peak_rss_mb']:.0f} MB at {b['images']}: "
        f"{100 * targets['memory_flat']['value']:+.1f}%, limit +{100 * targets['memory_flat']['target']:.0f}%)",
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
    ax.axhline(result["targets"]["decode_rate"]["target"], color="tab:red", linestyle="--", linewidth=1,
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
