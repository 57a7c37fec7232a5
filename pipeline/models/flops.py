"""Analytic training compute of each method, per image: what the report and the benchmark compare.

Counts the matmul FLOPs (2 x multiply-adds) of the transformer blocks (pipeline.models.encoder.encoder_flops):
the student's forward + backward (3 x forward) and the teacher's forward (no backward). Patch embedding,
heads and norms are left out: they are under 2% of a step at every preset here.
"""
from __future__ import annotations

from pipeline.models.encoder import encoder_flops


def token_counts(params: dict) -> tuple[int, int, int]:
    """(patches L, visible V, masked M) of one image under the study's mask ratio."""
    m, d = params["model"], params["data"]
    num = (d["img_size"] // m["patch_size"]) ** 2
    visible = int(num * (1 - params["pretrain"]["mask_ratio"]))
    return num, visible, num - visible


def cross_attention_flops(dim: int, depth: int, queries: int, context: int, context_dim: int,
                          project_context: bool = False) -> float:
    """Extra FLOPs of `depth` cross-attention sublayers (BootMAE's target-aware decoder): q and output
    projections per query, keys and values from the context (project_context: through a Linear to the
    decoder width first, pipeline.models.decoder.CrossAttention), and the attention itself."""
    per_context = context_dim * dim + 2 * dim * dim if project_context else 2 * context_dim * dim
    projections = 2 * (queries * 2 * dim * dim + context * per_context)
    return depth * (projections + 2 * 2 * queries * context * dim)


def visible_encoder(params: dict) -> float:
    """The encoder on the cls token + the visible patches."""
    m = params["model"]
    return encoder_flops(m["embed_dim"], m["depth"], 1 + token_counts(params)[1])


def full_encoder(params: dict, model: dict | None = None) -> float:
    """An encoder (the student's, or `model`: a teacher of another size) on the cls token + every patch."""
    m = model or params["model"]
    return encoder_flops(m["embed_dim"], m["depth"], 1 + token_counts(params)[0])


def pixel_decoder(params: dict) -> float:
    """MAE's light decoder on every token."""
    m = params["model"]
    return encoder_flops(m["decoder_dim"], m["decoder_depth"], 1 + token_counts(params)[0])


def flops_per_image(params: dict, method: str, teacher: dict | None = None) -> dict[str, float]:
    """{"student_forward", "teacher_forward", "train"} FLOPs of one training image; train = 3 x student + teacher.
    Each method counts its own forwards (its module's forward_flops, pipeline.methods).

    teacher: the model config of dBOT's frozen teacher when it differs from the student (a wider or deeper
    external checkpoint); by default the teacher is the student's architecture.
    """
    from pipeline import methods

    student, teacher_forward = methods.module(method).forward_flops(params, teacher)
    return {"student_forward": student, "teacher_forward": teacher_forward, "train": 3 * student + teacher_forward}
