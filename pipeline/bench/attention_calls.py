"""The attention calls of an MAE step at a preset's sizes, timed with every kernel (pipeline.bench.throughput's
attention table: flash, memory-efficient and math SDPA backends, the explicit matmuls; forward and backward)."""
from __future__ import annotations

from pipeline import hardware
from pipeline.bench import render
from pipeline.models.flops import token_counts
from pipeline.settings import Geometry


def shapes(params: dict) -> dict[str, tuple[int, int, int, int, int]]:
    """The self-attention calls of an MAE step at these params, (batch, heads, queries, keys, head_dim): the
    encoder on the cls token + the visible patches, the decoder on the cls token + every patch."""
    m, batch = params["model"], params["pretrain"]["batch_size"]
    patches, visible, _ = token_counts(Geometry.of(params))
    return {"encoder": (batch, m["num_heads"], 1 + visible, 1 + visible, m["embed_dim"] // m["num_heads"]),
            "decoder": (batch, m["decoder_heads"], 1 + patches, 1 + patches, m["decoder_dim"] // m["decoder_heads"])}


def measure(params: dict, device: str, precisions: list[str], progress) -> list[dict]:
    """Per precision and attention call of an MAE step (attention_shapes): each kernel's forward and backward
    time (hardware.attention_timings: flash, memory-efficient, math SDPA backends and the explicit matmuls) and the
    kernel the pipeline runs there (hardware.attention_kernel)."""
    out = []
    for precision in precisions:
        dtype = hardware.DTYPES[precision]
        for where, shape in shapes(params).items():
            timings = hardware.attention_timings(device, dtype, *shape, reps=5)
            chosen = hardware.attention_kernel(device, dtype, *shape, backward=True)
            out.append({"precision": precision, "call": where, "shape": list(shape), "kernels": timings,
                        "chosen": chosen})
            progress(render.attention_line(out[-1]))
    return out
