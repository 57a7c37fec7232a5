"""The scaling benchmark on the tiny preset: every sweep holds the preset's own point and the settings around it,
each point is a real measurement with its FLOPs and MFU, the dBOT chain's stages add up, and scaling.json,
scaling.md and scaling.png are well formed (no timing assertion beyond positivity)."""
import json
import math
import re

import pytest

from pipeline import config
from pipeline.bench import scaling
from pipeline.errors import PipelineError

POINT_KEYS = {"value", "tokens", "step_s", "images_per_s", "flops_per_step", "gflops_per_s", "mfu", "flop_model_s",
              "peak_mem_mb", "peak_gflops_here"}


def test_scaling_writes_well_formed_results(workdir, one_thread):
    result = scaling.main(["--preset", "tiny", "--steps", "1", "--chain-stages", "2", "--chain-images", "128",
                                 "--peak-size", "256", "--device", "cpu", "--out", "out/bench"])
    out = workdir / "out/bench"
    written = json.loads((out / "scaling.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert set(written["sweeps"]) == set(scaling.SWEEPS)
    params = config.load("tiny")
    precisions = written["precisions"]          # fp32 and the native others: what this machine runs at full speed
    assert precisions[0] == "fp32" and written["chain_precision"] in precisions
    assert set(precisions) | set(written["skipped_precisions"]) == {"fp32", "bf16", "fp16"}
    for name, points in written["sweeps"].items():
        assert {p["precision"] for p in points} == set(precisions)
        for precision in precisions:
            values = [p["value"] for p in points if p["precision"] == precision]
            assert values == scaling.sweep_values(params, name) and len(values) >= 2
            base = next(p for p in points
                        if p["value"] == written["preset_settings"][name] and p["precision"] == precision)
            assert math.isclose(base["flop_model_s"], base["step_s"])
        for p in points:
            assert POINT_KEYS <= set(p) and all(p[k] > 0 for k in POINT_KEYS), (name, p)
            assert math.isclose(p["gflops_per_s"], p["flops_per_step"] / p["step_s"] / 1e9)
    tokens = [p["tokens"] for p in written["sweeps"]["img_size"] if p["precision"] == "fp32"]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)       # larger images, more patches
    batch = written["sweeps"]["batch_size"]
    assert all(math.isclose(p["flops_per_step"] / batch[0]["flops_per_step"], p["value"] / batch[0]["value"])
               for p in batch)                                                   # FLOPs grow with the batch
    chain = written["dbot_chain"]
    assert [s["stages"] for s in chain] == [1, 2]
    assert math.isclose(chain[-1]["cumulative_s"], sum(s["stage_s"] for s in chain))
    assert all(math.isfinite(s["final_loss"]) for s in chain)
    md = re.sub(" +", " ", (out / "scaling.md").read_text())       # table cells unpadded (to_markdown pads)
    assert all(f"| {name} | precision | patches |" in md for name in scaling.SWEEPS) and "## dBOT chain" in md
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*")) and not (workdir / "results/bench").exists()


def test_sweep_values_include_the_preset_and_stay_valid():
    params = config.load("full")                                     # the 98-px, 192-wide study
    assert scaling.sweep_values(params, "img_size") == [42, 70, 98, 140, 196]   # grids 3, 5, 7, 10, 14
    assert scaling.sweep_values(params, "patch_size") == [7, 14, 49]
    assert scaling.sweep_values(params, "embed_dim") == [96, 192, 384, 768]
    assert scaling.sweep_values(params, "batch_size") == [16, 32, 64, 128, 256]
    for name in scaling.SWEEPS:
        for value in scaling.sweep_values(params, name):
            p = scaling.with_setting(params, name, value)
            assert p["data"]["img_size"] % p["model"]["patch_size"] == 0
    assert params["model"]["embed_dim"] == 192                                # with_setting copies


def test_bad_settings_fail_before_measuring(capsys):
    params = config.load("full")
    with pytest.raises(PipelineError, match="embed_dim 100 does not divide by model.num_heads 3"):
        scaling.with_setting(params, "embed_dim", 100)
    with pytest.raises(SystemExit):
        scaling.parse_args(["--chain-stages", "-1"])
    assert "--chain-stages >= 0" in capsys.readouterr().err
