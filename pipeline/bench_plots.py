"""Rendering of the benchmark's results (pipeline.bench): its progress lines, the tables of bench.md and the
loss curves of the modes (modes_loss.png, drawn on matplotlib's Agg canvas by pipeline.plots.save_png).
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.checkpoint import atomic_write
from pipeline.plots import save_png

MODE_STYLE = {"fp32": ("tab:blue", "-"), "bf16": ("tab:orange", "--"), "compile": ("tab:green", ":")}


def row_line(r: dict) -> str:
    return (f"{r['method']:10s} {r['precision']}: {r['images_per_s']:8.1f} img/s  step {1000 * r['step_s']:7.1f} ms  "
            f"{r['gflops_per_s']:7.1f} GFLOP/s  MFU {100 * r['mfu']:5.2f}%  peak {r['peak_mem_mb']:7.1f} MB  "
            f"ratio to mae {r['step_ratio_to_mae']:.2f} (FLOPs {r['flop_ratio_to_mae']:.2f})")


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
    head = ["| method | precision | img/s | step ms | GFLOP/s | MFU % | peak MB | step ratio | FLOP ratio |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    return head + [f"| {r['method']} | {r['precision']} | {r['images_per_s']:.1f} | {1000 * r['step_s']:.1f} | "
                   f"{r['gflops_per_s']:.1f} | {100 * r['mfu']:.2f} | {r['peak_mem_mb']:.1f} | "
                   f"{r['step_ratio_to_mae']:.2f} | {r['flop_ratio_to_mae']:.2f} |" for r in rows]


def _modes_table(modes: dict) -> list[str]:
    lines = ["| mode (precision) | step ms | first step ms | final loss | final loss - fp32 |",
             "|---|--:|--:|--:|--:|"]
    for mode, run in modes.items():
        if "error" in run:
            lines.append(f"| {_mode_name(mode, run)} | failed: {_cell(run['error'])} | | | |")
        else:
            lines.append(f"| {_mode_name(mode, run)} | {1000 * run['step_s']:.1f} | "
                         f"{1000 * run['first_step_s']:.0f} | {run['final_loss']:.4f} | "
                         f"{run['final_loss_diff_to_fp32']:+.2e} |")
    return lines


def markdown(result: dict) -> str:
    """bench.md: the rows table, the modes table, the data-loading line and the matmul peaks."""
    peaks = result["peak_gflops"]
    return "\n".join([
        f"# Benchmark: preset {result['preset']} ({result['device']}, {result['threads']} threads, batch "
        f"{result['batch_size']}, median of {result['steps']} steps, torch {result['torch']})", "",
        *_rows_table(result["rows"]), "",
        f"## Modes: MAE, {result['curve_steps']} steps on the real train images (same init and batches)", "",
        *_modes_table(result["modes"]), "",
        loading_line(result["data_loading"]) + " (batches made as engine._step makes them)", "",
        f"Matmul peak (n = {result['peak_matmul_size']}): fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 "
        f"{peaks['bf16']:.1f} GFLOP/s. MFU = GFLOP/s / the peak of the row's precision.", ""])


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
    ax.set(xlabel="step", ylabel="training loss", title="MAE: fp32 vs bf16 autocast vs torch.compile, same batches")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    save_png(fig, path)
