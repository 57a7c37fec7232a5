"""The benchmark command on the tiny preset: it measures every registered method in fp32, in the default
precision (through `precision: auto`) and in bf16 asked for with --precisions (emulated, so slow, on a CPU
without bf16 units: fine at this size), the matmul peaks, data loading and the modes, and writes well-formed
bench.json, bench.md and modes_loss.png. No assertion about speed or MFU: they are what the machine at hand
gives (an emulated bf16 matmul peak can sit below a whole step's throughput). Which precisions a run measures
or skips is tested on forced machine descriptions.

One torch thread (the children inherit it): the test checks the outputs, not the speed, and stays light on a
shared machine. torch.compile runs with the aot_eager backend (dynamo + AOTAutograd, no C++ code generation):
inductor takes minutes to compile on a small CPU; the benchmark's default backend is inductor.
"""
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from pipeline import config, hardware
from pipeline.bench import breakdown, throughput
from pipeline.methods import METHODS

ROW_KEYS = {"method", "precision", "setting", "images_per_s", "step_s", "mfu", "step_ratio_to_mae",
            "step_ratio_at_equal_peak", "flop_ratio_to_mae",
            "peak_mem_mb", "gflops_per_s", "flops_per_step"}
POSITIVE = ROW_KEYS - {"method", "precision", "setting"}
CURVE_STEPS = 3


def test_bench_writes_well_formed_results(workdir, one_thread):
    result = throughput.main(["--preset", "tiny", "--steps", "1", "--curve-steps", str(CURVE_STEPS),
                              "--precisions", "bf16", "--device", "cpu", "--peak-size", "256",
                              "--compile-backend", "aot_eager", "--out", "out/bench"])
    out = workdir / "out/bench"
    written = json.loads((out / "bench.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert not (workdir / "results/bench").exists()      # --out is honoured
    check_default(written)
    check_rows_and_peaks(written)
    check_modes(written["modes"], written["default_precision"])
    md = re.sub(" +", " ", (out / "bench.md").read_text())         # table cells unpadded (to_markdown pads)
    default = written["default_precision"]
    assert all(f"| {m} | {p if p != default else p + ' (auto)'} |" in md for m in METHODS for p in ("fp32", "bf16"))
    assert f"Default precision (`precision: auto`): **{default}**" in md
    assert "compile" in md and "data loading" in md and "Matmul peak" in md
    assert (out / "modes_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_default(written: dict) -> None:
    """The default precision is what `auto` picks on this machine, measured for every method, and compared."""
    auto = hardware.resolve("auto", "cpu")
    assert (written["default_precision"], written["default_precision_reason"]) == (auto.name, auto.reason)
    assert written["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert written["measured_precisions"] == ["fp32", "bf16"]           # fp16 is never native on a CPU: skipped
    assert set(written["skipped_precisions"]) == {"fp16"} and "not native" in written["skipped_precisions"]["fp16"]
    assert set(written["default_vs_fastest"]) == set(METHODS)
    for method, ratio in written["default_vs_fastest"].items():
        rows = [r for r in written["rows"] if r["method"] == method]
        auto_row = next(r for r in rows if r["setting"] == "auto")
        assert auto_row["precision"] == auto.name
        assert math.isclose(ratio, auto_row["images_per_s"] / max(r["images_per_s"] for r in rows))
    assert written["default_meets_target"] == (min(written["default_vs_fastest"].values()) >= throughput.TARGET)


def check_rows_and_peaks(written: dict) -> None:
    assert written["threads"] == 1
    assert set(written["peak_gflops"]) == {"fp32", "bf16"} and all(v > 0 for v in written["peak_gflops"].values())
    assert {(r["method"], r["precision"]) for r in written["rows"]} == {
        (m, p) for m in METHODS for p in ("fp32", "bf16")}
    assert len(written["rows"]) == 2 * len(METHODS)
    for row in written["rows"]:
        assert ROW_KEYS <= set(row)
        assert all(row[k] > 0 and math.isfinite(row[k]) for k in POSITIVE), row
        assert row["setting"] == ("auto" if row["precision"] == written["default_precision"] else row["precision"])
        assert math.isclose(row["gflops_per_s"], row["flops_per_step"] / row["step_s"] / 1e9)
    assert [r["step_ratio_to_mae"] for r in written["rows"] if r["method"] == "mae"] == [1.0, 1.0]
    assert [r["step_ratio_at_equal_peak"] for r in written["rows"] if r["method"] == "mae"] == [1.0, 1.0]
    assert written["data_loading"]["images_per_s"] > 0 and written["data_loading"]["ratio_to_mae_training"] > 0


def check_modes(modes: dict, default: str) -> None:
    assert set(modes) == {"fp32", "bf16", "compile"} and modes["compile"]["precision"] == default
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
    run = throughput.mode_run(params, data, "compile", 2, "cpu", backend="no_such_backend")
    assert run["precision"] == "fp32" and run["backend"] == "no_such_backend"
    assert "no_such_backend" in run["error"] and "losses" not in run


@pytest.mark.parametrize("features, asked, measured, skipped", [
    ({"capability": "AVX2", "amx": False, "avx512_bf16": False}, None, ["fp32"], {"bf16", "fp16"}),
    ({"capability": "AVX2", "amx": False, "avx512_bf16": False}, ["bf16"], ["fp32", "bf16"], {"fp16"}),
    ({"capability": "AVX512", "amx": True, "avx512_bf16": True}, None, ["fp32", "bf16"], {"fp16"}),
    ({"capability": "AVX512", "amx": True, "avx512_bf16": True}, ["fp16"], ["fp32", "bf16", "fp16"], set()),
])
def test_precisions_a_machine_lacks_are_skipped_unless_asked_for(monkeypatch, features, asked, measured, skipped):
    monkeypatch.setattr(hardware, "cpu_features", lambda: dict(features, onednn_max_isa=None))
    default, got, why = throughput.plan_precisions("cpu", asked)
    assert got == measured and set(why) == skipped and default.name in got
    assert all("not native here; --precisions" in text for text in why.values())


def test_bench_at_paper_scale_measures_every_method_with_its_breakdown(workdir, one_thread):
    """The imagenet preset's ViT-B/16 at 224 px (its width, heads and tokens), cut to one block and one image a
    step: every method in every precision this machine runs natively, each row with its step breakdown, and the
    attention kernels at the preset's token counts; no data folder is needed (random images, no modes)."""
    result = throughput.main(["--preset", "imagenet", "--batch-size", "1", "--depth", "1", "--steps", "1",
                              "--warmup", "0", "--device", "cpu", "--peak-size", "128", "--out", "out/vitb"])
    written = json.loads((workdir / "out/vitb/bench.json").read_text())
    assert written == json.loads(json.dumps(result))
    precisions = [p for p in ("fp32", "bf16") if hardware.native(p, "cpu")[0]]
    assert written["measured_precisions"] == precisions
    assert (written["batch_size"], written["img_size"], written["model"]["embed_dim"]) == (1, 224, 768)
    assert (written["model"]["depth"], written["model"]["decoder_depth"]) == (1, 1)
    assert {(r["method"], r["precision"]) for r in written["rows"]} == {(m, p) for m in METHODS for p in precisions}
    for row in written["rows"]:
        parts = row["breakdown"]
        assert set(parts) == {"profiled_s", *breakdown.PARTS} and parts["profiled_s"] > 0
        assert math.isclose(sum(parts[p] for p in breakdown.PARTS), 1.0) and parts["matmul"] > 0
    # MAE at batch 1: the encoder on 1 + 49 tokens x 12 heads of 64, the decoder on 1 + 196 x 16 heads of 32
    assert [(a["precision"], a["call"], a["shape"]) for a in written["attention"]] == [
        (p, call, shape) for p in precisions
        for call, shape in (("encoder", [1, 12, 50, 50, 64]), ("decoder", [1, 16, 197, 197, 32]))]
    for a in written["attention"]:
        assert a["chosen"] in ("fused", "explicit") and "error" in a["kernels"]["efficient"]   # CUDA-only backend
        assert all(t["forward_s"] > 0 and t["backward_s"] > 0 for k, t in a["kernels"].items() if k != "efficient")
    assert written["modes"] is None and "stream" in written["modes_skipped"]
    md = (workdir / "out/vitb/bench.md").read_text()
    assert "Step breakdown" in md and "Attention kernels" in md and "encoder 1 x 768" in md
    assert not (workdir / "out/vitb/modes_loss.png").exists()


def _event(name: str, parent=None) -> SimpleNamespace:
    return SimpleNamespace(name=name, cpu_parent=parent)


@pytest.mark.parametrize("chain, expected", [
    (["aten::mm", "aten::matmul", "aten::linear"], "matmul"),
    (["aten::addmm", "aten::linear"], "matmul"),
    (["aten::copy_", "aten::_to_copy", "aten::to", "aten::linear"], "casts"),
    (["aten::copy_", "aten::_to_copy", "autograd::engine::evaluate_function: ToCopyBackward0"], "casts"),
    (["aten::copy_", "aten::clone"], "other"),                           # a layout copy, not a cast
    (["aten::bmm", "aten::matmul"], "attention_forward"),
    (["aten::_softmax", "aten::softmax"], "attention_forward"),
    (["aten::bmm", "BmmBackward0", "autograd::engine::evaluate_function: BmmBackward0"], "attention_backward"),
    (["aten::empty", "aten::_scaled_dot_product_flash_attention_for_cpu"], "attention_forward"),
    (["aten::_fused_adamw_", "Optimizer.step#AdamW.step"], "optimizer"),
    (["aten::_foreach_norm"], "optimizer"),
    (["aten::mul_", "Optimizer.step#AdamW.step"], "optimizer"),
    (["aten::native_layer_norm", "aten::layer_norm"], "other"),
])
def test_breakdown_puts_each_op_in_its_part(chain, expected):
    event = None
    for name in reversed(chain):
        event = _event(name, event)
    assert breakdown.part(event) == expected


def test_breakdown_of_a_profiled_step_sums_to_one():
    a, w = torch.randn(64, 256, requires_grad=True), torch.randn(256, 256)

    def step():
        for _ in range(4):
            (a @ w).sum().backward()
    parts = breakdown.step_breakdown(step, "cpu")
    assert parts["profiled_s"] > 0 and math.isclose(sum(parts[p] for p in breakdown.PARTS), 1.0)
    assert parts["matmul"] > 0 and parts["casts"] == parts["optimizer"] == 0.0


def test_max_batch_doubles_until_a_step_runs_out_of_memory(monkeypatch):
    tried = []

    def fake_measure(params, method, precision, steps, device, pool, peak_size, how):
        batch = params["pretrain"]["batch_size"]
        tried.append(batch)
        if batch > 32:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"step_s": 0.5, "peak_mem_mb": 100.0 * batch, "peak_gflops_here": 1.0}
    monkeypatch.setattr(throughput, "measure", fake_measure)
    params = config.load("tiny")
    got = throughput.max_batch(params, "mae", "bf16", "cuda", 256)
    assert tried == [8, 16, 32, 64] and params["pretrain"]["batch_size"] == 128      # the params are not changed
    assert got == {"method": "mae", "precision": "bf16", "batch_size": 32, "peak_mem_mb": 3200.0,
                   "images_per_s": 64.0, "failed_at": 64}
    assert throughput.max_batch(params, "mae", "bf16", "cuda", 256, start=64)["batch_size"] is None
    assert throughput.max_batch(params, "mae", "bf16", "cuda", 256, limit=16)["failed_at"] is None
