"""Rendering of the benchmarks' results: pipeline.bench.throughput's progress lines, the tables of bench.md and the loss
curves of the modes (modes_loss.png); pipeline.bench.scaling's scaling.md and scaling.png. Figures are drawn on
matplotlib's Agg canvas by pipeline.plots.save_png.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

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
    peaks = result["peak_gflops"]
    return "\n".join([
        f"# Benchmark: preset {result['preset']} ({result['device']}: {result['device_name']}, {result['cpu']}, "
        f"{result['threads']} threads, batch {result['batch_size']}, median of {result['steps']} steps, "
        f"torch {result['torch']})", "",
        *_default_lines(result),
        *_rows_table(result["rows"]), "",
        f"## Modes: MAE, {result['curve_steps']} steps on the real train images (same init and batches)", "",
        *_modes_table(result["modes"]), "",
        loading_line(result["data_loading"]) + " (batches made as engine.train_step makes them)", "",
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
