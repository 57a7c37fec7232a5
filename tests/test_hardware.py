"""pipeline.hardware: `precision: auto` takes every branch of its choice from what torch reports (forced here),
explicit precisions are kept and flagged when not native, the device setting, autocast and the GradScaler, and
the old `bf16:` keys get a one-line error naming the new key."""
import os
from pathlib import Path

import pytest
import torch

from pipeline import config, hardware
from pipeline.errors import PipelineError

AVX2 = {"capability": "AVX2", "amx": False, "avx512_bf16": False, "onednn_max_isa": None}
AVX512 = dict(AVX2, capability="AVX512")                       # AVX-512 without bf16 units
AVX512_BF16 = dict(AVX512, avx512_bf16=True)
AMX = dict(AVX512, amx=True, avx512_bf16=True)


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given torch-reported features."""
    def use(features: dict) -> None:
        monkeypatch.setattr(hardware, "cpu_features", lambda: dict(features))
    return use


@pytest.fixture
def gpu(monkeypatch):
    """Pretend a CUDA device is there, with or without bf16."""
    def use(bf16: bool, name: str = "Fake GPU") -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0) if bf16 else (7, 0))
        monkeypatch.setattr(hardware, "cuda_bf16", lambda: bf16)
    return use


@pytest.mark.parametrize("features, chosen", [
    (AVX2, "fp32"), (AVX512, "fp32"), (AVX512_BF16, "bf16"), (AMX, "bf16"),
    (dict(AMX, capability="AVX2"), "fp32"),            # ATEN_CPU_CAPABILITY=avx2 on an AMX machine
    (dict(AMX, onednn_max_isa="AVX2"), "fp32"),         # ONEDNN_MAX_CPU_ISA=AVX2: oneDNN may not use the bf16 units
    (dict(AMX, onednn_max_isa="AVX512_CORE_AMX"), "bf16"),
])
def test_auto_on_a_cpu_takes_bf16_only_with_usable_bf16_units(cpu, features, chosen):
    cpu(features)
    p = hardware.resolve("auto", "cpu")
    assert (p.name, p.asked, p.scaled) == (chosen, "auto", False)
    assert features["capability"] in p.reason and f"-> {chosen}" in p.reason


@pytest.mark.parametrize("bf16, chosen", [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu_takes_bf16_or_fp16_with_a_scaler(gpu, bf16, chosen):
    gpu(bf16, "Tesla V100" if not bf16 else "A100")
    p = hardware.resolve("auto", "cuda")
    assert p.name == chosen and p.scaled == (chosen == "fp16")
    assert ("V100" if not bf16 else "A100") in p.reason and (bf16 or "GradScaler" in p.reason)


def test_an_explicit_precision_is_kept_and_flagged_when_emulated(cpu):
    cpu(AVX2)
    assert hardware.resolve("fp32", "cpu").reason == "asked for fp32 (CPU capability AVX2, bf16 units: none)"
    slow = hardware.resolve("bf16", "cpu")
    assert slow.name == "bf16" and "not native here" in slow.reason
    cpu(AMX)
    assert "not native" not in hardware.resolve("bf16", "cpu").reason
    assert "not native" in hardware.resolve("fp16", "cpu").reason
    with pytest.raises(PipelineError, match="precision 'half' is not one of auto, fp32, bf16, fp16"):
        hardware.resolve("half", "cpu")


def test_record_is_what_nodes_write():
    p = hardware.resolve("fp32", "cpu")
    assert p.record() == {"precision": "fp32", "precision_asked": "fp32", "precision_reason": p.reason}


def test_device_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.device("auto") == "cpu" and hardware.device("cpu") == "cpu"
    with pytest.raises(PipelineError, match="launch.device is cuda, but torch sees no CUDA device"):
        hardware.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hardware.device("auto") == "cuda"


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_and_scaler_follow_the_precision(name, dtype):
    p = hardware.Precision(name, name, "test", "cpu")
    layer = torch.nn.Linear(4, 4)
    with p.autocast(layer):
        assert layer(torch.randn(2, 4)).dtype == dtype
    scaler = p.grad_scaler()
    assert scaler.is_enabled() == (name == "fp16")


def cpuinfo_flags() -> set[str]:
    """This CPU's feature flags as the kernel lists them (/proc/cpuinfo): what to check torch's reading against."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo to check torch's reading of the CPU against")
    flags = next(line for line in info.read_text().splitlines() if line.startswith("flags"))
    return set(flags.split(":", 1)[1].split())


def bf16_units(flags: set[str]) -> bool:
    """Native bf16 on this CPU, from the kernel's flags: AMX or AVX512-BF16 units, ATen at its AVX512 level."""
    return bool({"amx_bf16", "avx512_bf16"} & flags) and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def test_the_real_machine_is_read_through_torch(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    f, flags = hardware.cpu_features(), cpuinfo_flags()
    assert f["capability"] == torch.backends.cpu.get_cpu_capability()
    assert f["amx"] == ("amx_tile" in flags) and f["avx512_bf16"] == ("avx512_bf16" in flags)
    assert hardware.resolve("auto", "cpu").name == ("bf16" if bf16_units(flags) else "fp32")


def test_the_machine_description_is_this_machines(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    m, flags = hardware.describe_machine(), cpuinfo_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    assert m["cpu_capability"] == capability
    assert m["class"] == ("cpu-amx" if bf16_units(flags) and "amx_tile" in flags else
                          "cpu-avx512-bf16" if bf16_units(flags) else f"cpu-{capability.lower()}")
    assert 1 <= m["cores"] <= (os.cpu_count() or 1) and len(m["load_average"]) == 3 and m["model"]


@pytest.mark.parametrize("section", ["pretrain", "knn", "linprobe", "finetune", "segprobe"])
def test_an_old_bf16_key_names_the_new_one(tmp_path, section):
    old = tmp_path / "old.yaml"
    old.write_text(f"{section}: {{bf16: true}}\n")
    with pytest.raises(PipelineError, match=rf"{section}\.bf16 is now {section}\.precision: auto \| fp32 \| bf16"):
        config.load("tiny", files=[old])


def test_precision_values_are_checked():
    with pytest.raises(PipelineError, match="pretrain.precision: 'half' is not one of"):
        config.load("tiny", ["pretrain.precision=half"])
    assert config.load("default")["pretrain"]["precision"] == "auto"


# ---- attention kernels: the rule below MEASURED_ATTENTION_FLOPS, measured above it --------------------------

SMALL = (2, 2, 9, 9, 16)         # batch, heads, queries, keys, head dim: far below the measured size
LARGE = (8, 16, 197, 197, 32)    # MAE ViT-B's decoder at batch 8


@pytest.fixture
def timings(monkeypatch):
    """attention_timings replaced by given (forward + backward) seconds per kernel; its calls are counted."""
    calls = []

    def use(fused: float, explicit: float) -> list:
        def fake(device, dtype, batch, heads, queries, keys, head_dim, kernels=hardware.ATTENTION_KERNELS,
                 backward=True, reps=3):
            calls.append((batch, heads, queries, keys, head_dim))
            return {k: {"forward_s": {"fused": fused, "explicit": explicit}[k], "backward_s": 0.0} for k in kernels}
        monkeypatch.setattr(hardware, "attention_timings", fake)
        monkeypatch.setattr(hardware, "_CHOSEN", {})
        return calls
    return use


def test_small_attention_calls_keep_the_rule_without_measuring(timings):
    calls = timings(fused=1.0, explicit=0.001)
    assert hardware.attention_flops(*SMALL) < hardware.MEASURED_ATTENTION_FLOPS <= hardware.attention_flops(*LARGE)
    assert hardware.attention_kernel("cpu", torch.float32, *SMALL, backward=True) == "fused"
    assert hardware.attention_kernel("cpu", torch.bfloat16, *SMALL, backward=True) == "explicit"
    assert hardware.attention_kernel("cuda", torch.bfloat16, *SMALL, backward=True) == "fused"
    assert calls == []


def test_evaluation_calls_keep_the_rule_without_measuring(timings):
    """Without a backward (k-NN features, probes, online k-NN) even a large call runs the rule's kernel: an
    evaluation's numbers never depend on a timing of the moment."""
    calls = timings(fused=1.0, explicit=0.001)
    assert hardware.attention_kernel("cpu", torch.float32, *LARGE, backward=False) == "fused"
    assert hardware.attention_kernel("cpu", torch.bfloat16, *LARGE, backward=False) == "explicit"
    assert calls == []


@pytest.mark.parametrize("dtype, fused, explicit, chosen", [
    (torch.bfloat16, 1.0, 2.0, "fused"),         # the rule's explicit, but fused is 2x faster: measured wins
    (torch.bfloat16, 1.0, 1.05, "explicit"),     # within the margin: the rule's kernel stays
    (torch.float32, 2.0, 1.0, "explicit"),
    (torch.float32, 1.05, 1.0, "fused"),
])
def test_large_attention_calls_take_the_measured_faster_kernel_once(timings, dtype, fused, explicit, chosen):
    calls = timings(fused, explicit)
    assert hardware.attention_kernel("cpu", dtype, *LARGE, backward=True) == chosen
    assert hardware.attention_kernel("cpu", dtype, *LARGE, backward=True) == chosen
    assert calls == [LARGE]                        # measured once per shape and process


def test_attention_kernels_sets_each_call_to_the_chosen_kernel_and_restores(monkeypatch):
    from pipeline.models.encoder import build_encoder

    enc = build_encoder(dict(arch="vit_tiny_patch16_224", patch_size=2, embed_dim=32, depth=2, num_heads=2), 8, 1,
                        seed=0)
    asked, seen = [], []
    monkeypatch.setattr(hardware, "attention_kernel", lambda *a, **k: asked.append((a, k)) or "fused")
    for m in enc.modules():
        if hasattr(m, "fused_attn"):
            m.register_forward_hook(lambda m, args, out: seen.append(m.fused_attn))
    with hardware.attention_kernels(enc, "cpu", True):     # the rule: explicit on the CPU in bf16 ...
        assert {m.fused_attn for m in enc.modules() if hasattr(m, "fused_attn")} == {False}
        enc(torch.randn(3, 1, 8, 8))                      # ... the call: what attention_kernel chose
    assert seen == [True, True]
    assert asked[0] == (("cpu", torch.bfloat16, 3, 2, 17, 17, 16, True), {})
    assert {m.fused_attn for m in enc.modules() if hasattr(m, "fused_attn")} == {True}     # restored, hooks gone
    enc(torch.randn(3, 1, 8, 8))
    assert len(asked) == 2


def test_attention_timings_measure_every_kernel_on_the_same_math_without_touching_the_global_rng():
    q, k, v = (torch.randn(2, 2, 9, 16) for _ in range(3))
    reference = hardware.attend("explicit", q, k, v)
    for kernel in ("fused", "flash", "math"):
        assert torch.allclose(hardware.attend(kernel, q, k, v), reference, atol=1e-5)
    state = torch.get_rng_state()
    out = hardware.attention_timings("cpu", torch.float32, *SMALL, reps=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert set(out) == set(hardware.ATTENTION_KERNELS) and "error" in out["efficient"]    # CUDA only
    assert all(t["forward_s"] > 0 and t["backward_s"] > 0 for name, t in out.items() if name != "efficient")
    with torch.inference_mode():                          # a teacher's forward: still measurable
        assert "backward_s" not in hardware.attention_timings("cpu", torch.bfloat16, *SMALL, ("explicit",),
                                                              backward=False, reps=1)["explicit"]
