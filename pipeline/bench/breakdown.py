"""Where a training step's time goes, by the torch profiler: one step profiled, each op's own (self) time put in
one of PARTS.

- matmul: the dense matmuls (mm, addmm: linear layers, patch embedding, heads);
- attention_forward / attention_backward: the attention kernels (fused SDPA: flash, memory-efficient, math) and
  the explicit path's pieces (bmm / baddbmm of q k^T and of the weights with v, softmax), split by whether the
  autograd engine ran them;
- casts: dtype conversions (aten::_to_copy and its copy: autocast's casts of weights, activations and gradients);
- optimizer: AdamW (fused), gradient clipping and the EMA teacher's update (the _foreach_ ops, Optimizer.*);
- other: everything else (norms, GELU, adds, layout copies, masking, augmentation, the loss, dispatch).

On the CPU an op's time is its self CPU time (every op runs on the calling thread, the backward included); on
CUDA the device time of the kernels each op launched (its self device time), so the parts add up to the GPU's
busy time, not the wall time.
"""
from __future__ import annotations

PARTS = ("matmul", "attention_forward", "attention_backward", "casts", "optimizer", "other")
_MATMULS = {"aten::mm", "aten::addmm", "aten::_addmm_activation", "aten::matmul", "aten::linear", "aten::addmv",
            "aten::mv"}
_ATTENTION_OPS = {"aten::bmm", "aten::baddbmm", "aten::softmax", "aten::_softmax", "aten::_softmax_backward_data"}
_ATTENTION_WORDS = ("scaled_dot_product", "flash_attention", "efficient_attention")


def _chain(event) -> list[str]:
    """The names of an event and of its ancestors, innermost first."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names


def part(event) -> str:
    """Which of PARTS a profiler event's own time belongs to (see the module's docstring)."""
    chain = _chain(event)
    name = chain[0]
    if name.startswith(("aten::_foreach_", "aten::_fused_adam")) or any(n.startswith("Optimizer.") for n in chain):
        return "optimizer"
    if "aten::_to_copy" in chain:
        return "casts"
    if name in _ATTENTION_OPS or any(w in n for n in chain for w in _ATTENTION_WORDS):
        backward = any(n.startswith("autograd::engine::evaluate_function") for n in chain)
        return "attention_backward" if backward else "attention_forward"
    return "matmul" if name in _MATMULS else "other"


def step_breakdown(step, device: str) -> dict:
    """Run `step()` once under the torch profiler: {"profiled_s": the parts' total in seconds, part: its share
    of it, for every part of PARTS}."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
    seconds = dict.fromkeys(PARTS, 0.0)
    for event in prof.events():
        if cuda and event.device_type != DeviceType.CPU:   # a kernel: counted in the op that launched it
            continue
        own = event.self_device_time_total if cuda else event.self_cpu_time_total
        seconds[part(event)] += own / 1e6
    total = sum(seconds.values())
    return {"profiled_s": total, **{p: s / total if total else 0.0 for p, s in seconds.items()}}
