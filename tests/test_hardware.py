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
