"""The machine at hand: which device a node runs on and in which numeric precision, and why.

Every `precision` key of params (pretrain, finetune, knn, linprobe, segprobe, analyze) takes
auto | fp32 | bf16 | fp16. `auto`, the default, picks what is fastest here without changing the loss curve:

- CUDA with bf16 (Ampere and newer)      -> bf16 autocast;
- CUDA without (V100, T4)                -> fp16 autocast with a GradScaler (dynamic loss scaling);
- a CPU with AMX or AVX512-BF16 units    -> bf16 autocast (the matmuls run on the bf16 units);
- any other CPU                          -> fp32. Without bf16 units torch emulates bf16 matmuls: measured on a
  2-core AMD EPYC with AVX2 only, 0.9 GFLOP/s in bf16 against 64 in fp32, and the default MAE step 17x slower.

The CPU is read through torch's own queries: torch.backends.cpu.get_cpu_capability() (the kernel level ATen
dispatches to; ATEN_CPU_CAPABILITY=avx2 lowers it), torch.cpu._is_amx_tile_supported() and
torch.cpu._is_avx512_bf16_supported(); bf16 also needs oneDNN, which does the matmuls, to be allowed a bf16 ISA
(ONEDNN_MAX_CPU_ISA=AVX2 forbids it). So `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` on any x86 machine
makes `auto` choose what an AVX2-only CPU gets. The device: `launch.device` auto (CUDA if there is one) | cpu | cuda.

Attention (attention_kernels, entered with the autocast): each call of timm's Attention or the decoder's
CrossAttention runs fused scaled_dot_product_attention or the explicit softmax(q k^T) v matmuls. Small calls and
every evaluation call (no backward: features never depend on a timing) take rule_kernel's choice; training calls
of at least MEASURED_ATTENTION_FLOPS (ViT-B's: 61 MFLOP in MAE's encoder, 636 in its
decoder at batch 8) take the faster of the two as measured on this device, in this precision, at the call's
shapes, once per process (attention_kernel); pipeline.bench.throughput records each kernel's timings. The choices are
part of a run's resumable state, so a resumed run keeps its kernels and ends bit-identical to an uninterrupted one;
two separate runs at such sizes may differ in rounding where their measurements picked different kernels.

Each node records its Precision (`record()`: the precision used, the one asked for, and the reason with the
capability seen) in its metrics.json and as MLflow tags.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import PipelineError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) under which oneDNN has no bf16 matmul kernels
_ONEDNN_NO_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def device(setting: str = "auto") -> str:
    """launch.device -> "cuda" or "cpu": auto = CUDA where torch sees a GPU, else the CPU."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise PipelineError("launch.device is cuda, but torch sees no CUDA device here; use auto or cpu")
    return setting


def device_name(dev: str) -> str:
    """The GPU's name, or the CPU's architecture and kind as the platform reports it."""
    if dev.startswith("cuda"):
        return torch.cuda.get_device_name()
    import platform

    return " ".join(v for v in (platform.machine(), platform.processor()) if v) or "cpu"


def machine_class(dev: str) -> str:
    """A short name for the kind of machine `dev` is, as the benchmarks' folders use it: gpu-<name> for a GPU;
    for a CPU, what decides its precision: cpu-amx, cpu-avx512-bf16, else cpu-<ATen capability> (cpu-avx2, ...)."""
    if dev.startswith("cuda"):
        return "gpu-" + "-".join(torch.cuda.get_device_name().lower().replace("nvidia", "").split())
    f = cpu_features()
    if cpu_bf16_native(f):
        return "cpu-amx" if f["amx"] else "cpu-avx512-bf16"
    return "cpu-" + f["capability"].lower().replace(" ", "")


def to_device(t: torch.Tensor, dev: str | torch.device) -> torch.Tensor:
    """A host tensor on `dev`: on CUDA through pinned memory with a non-blocking copy (the copy overlaps with
    the work already queued), elsewhere a plain .to()."""
    if torch.device(dev).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def cpu_features() -> dict:
    """What torch reports of this CPU (and the oneDNN ISA limit, if one is set)."""
    return {"capability": torch.backends.cpu.get_cpu_capability(), "amx": torch.cpu._is_amx_tile_supported(),
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() or None}


def cuda_bf16() -> bool:
    """Whether the current CUDA device has native bf16 (not the emulated kind)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_bf16_native(f: dict) -> bool:
    """bf16 units (AMX or AVX512-BF16), ATen at its AVX512 level, and oneDNN allowed to use them."""
    return ((f["amx"] or f["avx512_bf16"]) and f["capability"].startswith("AVX512")
            and f["onednn_max_isa"] not in _ONEDNN_NO_BF16)


def describe_cpu(f: dict) -> str:
    units = [name for name, has in (("AMX", f["amx"]), ("AVX512-BF16", f["avx512_bf16"])) if has]
    isa = f", ONEDNN_MAX_CPU_ISA={f['onednn_max_isa']}" if f["onednn_max_isa"] else ""
    return f"CPU capability {f['capability']}, bf16 units: {' + '.join(units) or 'none'}{isa}"


def describe_machine() -> dict:
    """This CPU machine as the benchmarks' pages name it: its class (machine_class), describe_cpu, the CPU model
    (/proc/cpuinfo), torch's CPU capability, the cores this process may use, Python, and the load average now."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor())
    features = cpu_features()
    return {"class": machine_class("cpu"), "cpu": describe_cpu(features), "model": model,
            "cpu_capability": features["capability"], "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def native(precision: str, dev: str) -> tuple[bool, str]:
    """(whether `precision` runs at full speed on `dev`, what was seen): fp32 always; bf16 on a CUDA device with
    bf16 or a CPU with bf16 units; fp16 on any CUDA device, never on a CPU (no fp16 matmul units targeted)."""
    if dev.startswith("cuda"):
        seen = (f"CUDA {torch.cuda.get_device_name()} "
                f"(capability {'.'.join(map(str, torch.cuda.get_device_capability()))})")
        return precision != "bf16" or cuda_bf16(), seen
    f = cpu_features()
    return precision == "fp32" or (precision == "bf16" and cpu_bf16_native(f)), describe_cpu(f)


@dataclass(frozen=True)
class Precision:
    """The numeric precision a node runs in: `name` fp32 | bf16 | fp16 on `device`, chosen from `asked`."""
    name: str
    asked: str
    reason: str
    device: str = "cpu"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.name == "fp32" else DTYPES[self.name]

    @property
    def scaled(self) -> bool:
        """fp16 needs loss scaling: its gradients underflow without it (bf16 has fp32's range)."""
        return self.name == "fp16"

    def record(self) -> dict:
        return {"precision": self.name, "precision_asked": self.asked, "precision_reason": self.reason}

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled for fp16 only (disabled, it passes the loss and the step through unchanged)."""
        return torch.amp.GradScaler(self.device.split(":")[0], enabled=self.scaled)

    @contextmanager
    def autocast(self, module: torch.nn.Module | None = None):
        """Autocast to this precision (nothing for fp32), with the attention kernels that suit it on this device
        (attention_kernels) for `module`."""
        kind = self.device.split(":")[0]
        cast = torch.autocast(device_type=kind, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)
        if module is None:
            with cast:
                yield
        else:
            with attention_kernels(module, kind, self.name != "fp32", self.autocast_dtype), cast:
                yield


def resolve(asked: str, dev: str = "cpu") -> Precision:
    """A precision setting (auto | fp32 | bf16 | fp16) on device `dev` -> the Precision to run in, with why."""
    if asked not in PRECISIONS:
        raise PipelineError(f"precision {asked!r} is not one of {', '.join(PRECISIONS)}")
    if asked != "auto":
        ok, seen = native(asked, dev)
        slow = "" if ok else "; not native here: expect it to be slow"
        return Precision(asked, asked, f"asked for {asked} ({seen}{slow})", dev)
    if dev.startswith("cuda"):
        _, seen = native("bf16", dev)
        name = "bf16" if cuda_bf16() else "fp16"
        why = "bf16" if name == "bf16" else "fp16 with a GradScaler (no bf16 on this GPU)"
        return Precision(name, "auto", f"auto: {seen} -> {why}", dev)
    f = cpu_features()
    name = "bf16" if cpu_bf16_native(f) else "fp32"
    why = "" if name == "bf16" else " (bf16 would be emulated, many times slower)"
    return Precision(name, "auto", f"auto: {describe_cpu(f)} -> {name}{why}", dev)


ATTENTION_KERNELS = ("flash", "efficient", "math", "explicit")   # what attention_timings measures
MEASURED_ATTENTION_FLOPS = 32e6   # attention calls of at least this many forward FLOPs get their kernel measured
ATTENTION_MARGIN = 1.1            # ... and leave the rule's kernel only for one this much faster (no noise flips)


def attention_flops(batch: int, heads: int, queries: int, keys: int, head_dim: int) -> float:
    """Forward FLOPs of one attention call: q k^T and (softmax) v, 2 x multiply-adds each."""
    return 4.0 * batch * heads * queries * keys * head_dim


def attend(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v through `kernel`: "explicit" (matmul, softmax, matmul: what timm's Attention and
    the decoder's CrossAttention run with fused_attn False), "fused" (scaled_dot_product_attention, torch's own
    choice of backend), or one SDPA backend ("flash", "efficient", "math"; RuntimeError where it cannot run)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if kernel == "explicit":
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    if kernel == "fused":
        return F.scaled_dot_product_attention(q, k, v)
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH}[kernel]
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def attention_timings(device: str, dtype: torch.dtype, batch: int, heads: int, queries: int, keys: int,
                      head_dim: int, kernels=ATTENTION_KERNELS, backward: bool = True, reps: int = 3) -> dict:
    """{kernel: {"forward_s", "backward_s"} (the fastest of `reps` calls after one warm-up: on a shared machine the
    least disturbed; backward_s only with `backward`) or {"error": why it cannot run}} of one attention call of
    these shapes on `device`, its inputs in `dtype` under that dtype's autocast, as the training step runs it.
    Seeded inputs from a generator of its own: torch's global random stream is left as it was."""
    import time

    kind = torch.device(device).type
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    gen = torch.Generator(device).manual_seed(0)
    shapes = ((batch, heads, queries, head_dim), (batch, heads, keys, head_dim), (batch, heads, keys, head_dim))
    out = {}
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(kind, dtype=dtype,
                                                                          enabled=dtype != torch.float32):
        q, k, v = (torch.randn(s, device=device, generator=gen).to(dtype).requires_grad_(backward) for s in shapes)
        grad = torch.randn(shapes[0], device=device, generator=gen).to(dtype)
        for kernel in kernels:
            fwd, bwd = [], []
            try:
                for _ in range(reps + 1):
                    sync()
                    start = time.perf_counter()
                    y = attend(kernel, q, k, v)
                    sync()
                    mid = time.perf_counter()
                    if backward:
                        torch.autograd.grad(y, (q, k, v), grad)
                        sync()
                    fwd.append(mid - start)
                    bwd.append(time.perf_counter() - mid)
            except RuntimeError as e:            # a backend with no kernel for these shapes / this device
                out[kernel] = {"error": str(e).splitlines()[0][:300]}
                continue
            out[kernel] = {"forward_s": min(fwd[1:]), **({"backward_s": min(bwd[1:])} if backward else {})}
    return out


def rule_kernel(device: str | torch.device, reduced: bool) -> str:
    """The kernel attention runs without a measurement: fused SDPA (on CUDA: flash / memory-efficient), except on
    the CPU under a reduced precision (bf16, fp16 autocast), where the explicit softmax(q k^T) v runs as plain
    matmuls. Measured on a 2-core AMX Xeon: PyTorch's CPU flash-attention backward in bf16 took 21 ms a call at
    13 tokens x 3 heads, 47% of a bf16 MAE step; without it the bf16 step is 1.8x faster. In fp32 both paths
    took the same time there."""
    return "fused" if torch.device(device).type != "cpu" or not reduced else "explicit"


_CHOSEN: dict[str, str] = {}   # "device|dtype|batch|heads|queries|keys|head_dim|backward" -> kernel


def attention_choices() -> dict[str, str]:
    """The kernels this process measured and chose so far, by call shape: a training run keeps them in its
    resumable state (pipeline.train.engine), so that a resumed process runs the kernels the run started with."""
    return dict(_CHOSEN)


def keep_attention_choices(saved: dict[str, str]) -> None:
    """Take the choices of the process that saved a resumable state (attention_choices) over any measurement:
    the same kernels, so the resumed run stays bit-identical to an uninterrupted one."""
    _CHOSEN.update(saved)


def attention_kernel(device: str, dtype: torch.dtype, batch: int, heads: int, queries: int, keys: int,
                     head_dim: int, backward: bool) -> str:
    """"fused" or "explicit" for one attention call of these shapes: in evaluation (no backward) and below
    MEASURED_ATTENTION_FLOPS the rule's kernel (rule_kernel: small calls weigh little in a step and their timings
    are noise; an evaluation's features must not depend on a timing); in training above it, the faster of the
    two by attention_timings (forward + backward), the rule's unless the other is at least
    ATTENTION_MARGIN faster. Measured once per shape and process (a few ms at ViT-B token counts); a resumed run keeps
    the choices it saved (keep_attention_choices)."""
    rule = rule_kernel(device, dtype != torch.float32)
    if not backward or attention_flops(batch, heads, queries, keys, head_dim) < MEASURED_ATTENTION_FLOPS:
        return rule     # evaluation (no backward): never a timing, so a probe's numbers depend on nothing else
    key = "|".join(map(str, (torch.device(device), dtype, batch, heads, queries, keys, head_dim, backward)))
    if key not in _CHOSEN:
        times = {kernel: sum(t.values()) for kernel, t in attention_timings(
            device, dtype, batch, heads, queries, keys, head_dim, ("fused", "explicit"), backward).items()
            if "error" not in t}
        other = "explicit" if rule == "fused" else "fused"
        faster = other in times and (rule not in times or times[other] * ATTENTION_MARGIN < times[rule])
        _CHOSEN[key] = other if faster else rule
    return _CHOSEN[key]


def _choose_attention(dtype: torch.dtype):
    """A forward pre-hook for an attention module (timm's Attention: x; the decoder's CrossAttention: x, context)
    that sets its fused_attn to attention_kernel's choice for the call's shapes. Under torch.compile it leaves the
    flag as it is (no measurement inside a traced graph)."""
    def hook(module: torch.nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling() or not args:
            return
        x = args[0]
        keys = args[1].shape[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else x.shape[1]
        heads = getattr(module, "num_heads", None) or module.heads
        backward = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        module.fused_attn = attention_kernel(str(x.device), dtype, x.shape[0], heads, x.shape[1], keys,
                                             x.shape[-1] // heads, backward) == "fused"
    return hook


@contextmanager
def attention_kernels(module: torch.nn.Module, device: str | torch.device, reduced: bool,
                      dtype: torch.dtype | None = None):
    """Within the block, every attention of `module` (timm's Attention, the decoder's CrossAttention: their
    `fused_attn`) runs the kernel chosen for the device, the precision (`dtype`: the autocast dtype; by default
    bf16 if `reduced`, else fp32) and the call's shapes: rule_kernel's on entry, then, per call, attention_kernel's
    (measured for calls large enough to matter, e.g. ViT-B's). The flags are restored after, so a k-NN probe in
    bf16 between fp32 training steps leaves the training kernels as they were."""
    dtype = dtype or (torch.bfloat16 if reduced else torch.float32)
    fused = rule_kernel(device, reduced) == "fused"
    attentions = [m for m in module.modules() if hasattr(m, "fused_attn")]
    before = [m.fused_attn for m in attentions]
    hooks = [m.register_forward_pre_hook(_choose_attention(dtype)) for m in attentions]
    for m in attentions:
        m.fused_attn = fused
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for m, flag in zip(attentions, before):
            m.fused_attn = flag
