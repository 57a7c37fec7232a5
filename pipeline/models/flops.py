"""Analytic training compute of each method, per image: what the report and the benchmark compare.

Counts the matmul FLOPs (2 x multiply-adds) of the transformer blocks (pipeline.models.encoder.encoder_flops):
the student's forward + backward (3 x forward) and the teacher's forward (no backward). Patch embedding,
heads and norms are left out: they are under 2% of a step at every preset here.
"""
from __future__ import annotations

from pipeline.models.encoder import encoder_flops
from pipeline.settings import Geometry


def token_counts(g: Geometry) -> tuple[int, int, int]:
    """(patches L, visible V, masked M) of one image under the study's mask ratio."""
    num = (g.img_size // g.model.patch_size) ** 2
    visible = int(num * (1 - g.mask_ratio))
    return num, visible, num - visible


def cross_attention_flops(dim: int, depth: int, queries: int, context: int, context_dim: int,
                          project_context: bool = False) -> float:
    """Extra FLOPs of `depth` cross-attention sublayers (BootMAE's target-aware decoder): q and output
    projections per query, keys and values from the context (project_context: through a Linear to the
    decoder width first, pipeline.models.decoder.CrossAttention), and the attention itself."""
    per_context = context_dim * dim + 2 * dim * dim if project_context else 2 * context_dim * dim
    projections = 2 * (queries * 2 * dim * dim + context * per_context)
    return depth * (projections + 2 * 2 * queries * context * dim)


def visible_encoder(g: Geometry) -> float:
    """The encoder on the cls token + the visible patches."""
    return encoder_flops(g.model.embed_dim, g.model.depth, 1 + token_counts(g)[1])


def full_encoder(g: Geometry, model: dict | None = None) -> float:
    """An encoder (the student's, or `model`: a teacher's config, of another size) on the cls token + every patch."""
    width, depth = (model["embed_dim"], model["depth"]) if model else (g.model.embed_dim, g.model.depth)
    return encoder_flops(width, depth, 1 + token_counts(g)[0])


def pixel_decoder(g: Geometry) -> float:
    """MAE's light decoder on every token."""
    m = g.model
    return encoder_flops(m.decoder_dim, m.decoder_depth, 1 + token_counts(g)[0])


def flops_per_image(params: dict, method: str, teacher: dict | None = None) -> dict[str, float]:
    """{"student_forward", "teacher_forward", "train"} FLOPs of one training image; train = 3 x student + teacher.
    Each method counts its own forwards from the params it reads (its module's forward_flops, pipeline.methods).

    teacher: the model config of dBOT's frozen teacher when it differs from the student (a wider or deeper
    external checkpoint); by default the teacher is the student's architecture.
    """
    from pipeline import methods

    student, teacher_forward = methods.module(method).forward_flops(params, teacher)
    return {"student_forward": student, "teacher_forward": teacher_forward, "train": 3 * student + teacher_forward}
