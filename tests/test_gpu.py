"""The GPU path, on a real CUDA device (`pytest -m gpu`; skipped where torch sees none; scripts/gpu-check.sh runs
these and the benchmark): `precision: auto` picks bf16 or fp16 from the device, every method trains on it in
the chosen precision (fp16 with its GradScaler), fused attention (SDPA) is kept on CUDA, the benchmark measures
on the GPU, and the tiny DAG builds with every node on the GPU."""
import json
import math
import os

import pytest
import torch
from conftest import copy_dag, run_cli
from data_parallel import train_all

from pipeline import hardware
from pipeline.bench import throughput
from pipeline.hardware import attention_kernels
from pipeline.methods import METHODS
from pipeline.models.encoder import build_encoder

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")]


def test_auto_precision_follows_the_gpu():
    p = hardware.resolve("auto", "cuda")
    assert p.name == ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16")
    assert p.scaled == (p.name == "fp16") and torch.cuda.get_device_name() in p.reason
    assert hardware.device("auto") == "cuda"


@pytest.mark.parametrize("precision", ["auto", "fp16", "fp32"])
def test_every_method_trains_on_the_gpu(tmp_path, precision):
    results = train_all(tmp_path, device="cuda", precision=precision)
    assert set(results) == set(METHODS)
    for name, r in results.items():
        assert torch.isfinite(r["loss"]).all() and not torch.equal(r["loss"][0], r["loss"][1]), name
        assert all(v.device.type == "cuda" for v in r["state"].values()), name


def test_fused_attention_stays_on_cuda_in_every_precision():
    enc = build_encoder({"arch": "vit_tiny_patch16_224", "patch_size": 2, "embed_dim": 32, "depth": 1,
                         "num_heads": 2}, 8, 1, seed=0).cuda()
    for reduced in (False, True):
        with attention_kernels(enc, "cuda", reduced):
            assert {m.fused_attn for m in enc.modules() if hasattr(m, "fused_attn")} == {True}


def test_bench_measures_on_the_gpu(workdir):
    result = throughput.main(["--preset", "tiny", "--steps", "3", "--curve-steps", "3", "--device", "cuda",
                         "--compile-backend", "aot_eager", "--out", "out/gpu"])
    assert result["device"] == "cuda" and result["default_precision"] in ("bf16", "fp16")
    assert {"fp32", "fp16"} <= set(result["measured_precisions"])      # fp16 runs natively on every CUDA GPU
    assert all(r["peak_mem_mb"] > 0 and r["images_per_s"] > 0 for r in result["rows"])
    assert all(math.isfinite(v) for v in result["default_vs_fastest"].values())


def test_tiny_dag_builds_on_the_gpu(tmp_path):
    workdir = copy_dag(tmp_path)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db"}
    run_cli("snakemake", "--cores", str(min(8, os.cpu_count() or 1)), "--config", "preset=tiny", cwd=workdir,
            env=env, timeout=3600)
    knn = json.loads((workdir / "results/seed0/knn/mae/metrics.json").read_text())
    assert knn["precision"] == hardware.resolve("auto", "cuda").name and "CUDA" in knn["precision_reason"]
    mae = json.loads((workdir / "results/seed0/pretrain/mae/metrics.json").read_text())
    assert "CUDA" in mae["precision_reason"]                  # the tiny preset trains in fp32, on the GPU
