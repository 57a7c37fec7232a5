"""The benchmark command on the tiny preset: it measures every registered method in both precisions, the
matmul peaks, data loading and the fp32 / bf16 / torch.compile modes, and writes well-formed bench.json,
bench.md and modes_loss.png (no timing assertion beyond positivity: speed is reported, never tested).

One torch thread (the children inherit it): the test checks the outputs, not the speed, and stays light on a
shared machine. torch.compile runs with the aot_eager backend (dynamo + AOTAutograd, no C++ code generation):
inductor takes minutes to compile on a small CPU; the benchmark's default backend is inductor.
"""
import json
import math
from types import SimpleNamespace

import torch

from pipeline import bench, config
from pipeline.methods import METHODS

ROW_KEYS = {"method", "precision", "images_per_s", "step_s", "mfu", "step_ratio_to_mae", "step_ratio_at_equal_peak",
            "flop_ratio_to_mae",
            "peak_mem_mb", "gflops_per_s", "flops_per_step"}
POSITIVE = ROW_KEYS - {"method", "precision", "mfu"}
CURVE_STEPS = 3


def test_bench_writes_well_formed_results(workdir, one_thread):
    result = bench.main(["--preset", "tiny", "--steps", "1", "--curve-steps", str(CURVE_STEPS),
                         "--peak-size", "512", "--compile-backend", "aot_eager", "--out", "out/bench"])
    out = workdir / "out/bench"
    written = json.loads((out / "bench.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert not (workdir / "results/bench").exists()      # --out is honoured
    check_rows_and_peaks(written)
    check_modes(written["modes"])
    md = (out / "bench.md").read_text()
    assert all(f"| {m} | {p} |" in md for m in METHODS for p in ("fp32", "bf16"))
    assert "compile" in md and "data loading" in md and "Matmul peak" in md
    assert (out / "modes_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_rows_and_peaks(written: dict) -> None:
    assert written["threads"] == 1
    assert written["peak_gflops"]["fp32"] > 0 and written["peak_gflops"]["bf16"] > 0
    assert {(r["method"], r["precision"]) for r in written["rows"]} == {
        (m, p) for m in METHODS for p in ("fp32", "bf16")}
    assert len(written["rows"]) == 2 * len(METHODS)
    for row in written["rows"]:
        assert ROW_KEYS <= set(row)
        assert all(row[k] > 0 for k in POSITIVE), row
        assert 0 < row["mfu"] < 1.5
        assert math.isclose(row["gflops_per_s"], row["flops_per_step"] / row["step_s"] / 1e9)
    assert [r["step_ratio_to_mae"] for r in written["rows"] if r["method"] == "mae"] == [1.0, 1.0]
    assert [r["step_ratio_at_equal_peak"] for r in written["rows"] if r["method"] == "mae"] == [1.0, 1.0]
    assert written["data_loading"]["images_per_s"] > 0 and written["data_loading"]["ratio_to_mae_training"] > 0


def check_modes(modes: dict) -> None:
    assert set(modes) == {"fp32", "bf16", "compile"}
    assert modes["fp32"]["final_loss_diff_to_fp32"] == 0.0
    for name, run in modes.items():
        if name == "compile" and "error" in run:       # compilation may fail on a machine: recorded, no crash
            assert run["error"]
            continue
        assert run["step_s"] > 0 and run["first_step_s"] > 0
        assert len(run["losses"]) == CURVE_STEPS and all(math.isfinite(v) for v in run["losses"])
        assert run["final_loss"] == run["losses"][-1]
        assert math.isfinite(run["final_loss_diff_to_fp32"])


def test_failed_compile_is_recorded_not_raised(workdir):
    params = config.load("tiny")
    data = SimpleNamespace(train_x=torch.zeros(8, 1, 8, 8, dtype=torch.uint8), mean=[0.5], std=[0.25])
    run = bench.mode_run(params, data, "compile", 2, "cpu", backend="no_such_backend")
    assert run["precision"] == "fp32" and run["backend"] == "no_such_backend"
    assert "no_such_backend" in run["error"] and "losses" not in run
