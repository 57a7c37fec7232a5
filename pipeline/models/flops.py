"""Analytic training compute of each method, per image: what the report and the benchmark compare.

Counts the matmul FLOPs (2 x multiply-adds) of the transformer blocks (pipeline.models.encoder.encoder_flops):
the student's forward + backward (3 x forward) and the teacher's forward (no backward). Patch embedding,
heads and norms are left out: they are under 2% of a step at every preset here.
"""
from __future__ import annotations

from pipeline.models.encoder import encoder_flops, flops_per_token_block


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


def flops_per_image(params: dict, method: str, teacher: dict | None = None) -> dict[str, float]:
    """{"student_forward", "teacher_forward", "train"} FLOPs of one training image; train = 3 x student + teacher.

    teacher: the model config of dBOT's frozen teacher when it differs from the student (a wider or deeper
    external checkpoint); by default the teacher is the student's architecture.
    """
    m = params["model"]
    num, visible, masked = token_counts(params)
    enc_visible = encoder_flops(m["embed_dim"], m["depth"], 1 + visible)
    enc_full = encoder_flops(m["embed_dim"], m["depth"], 1 + num)
    if teacher:
        full_teacher = encoder_flops(teacher["embed_dim"], teacher["depth"], 1 + num)
    else:
        full_teacher = enc_full
    decoder = encoder_flops(m["decoder_dim"], m["decoder_depth"], 1 + num)
    if method == "supervised":
        student, teacher = enc_full, 0.0
    elif method == "bootmae":       # a pixel decoder at decoder_dim, a feature decoder at embed_dim (or decoder_dim)
        cfg = params["bootmae"]
        project = cfg["block_order"] == "cross_self_mlp"
        student = enc_visible
        for dim in (m["decoder_dim"], m["embed_dim"] if cfg["feature_decoder"] == "encoder" else m["decoder_dim"]):
            student += encoder_flops(dim, m["decoder_depth"], 1 + num) + cross_attention_flops(
                dim, m["decoder_depth"], 1 + num, 1 + visible, m["embed_dim"], project)
        teacher = enc_full
    else:
        student = enc_visible + decoder
        teacher = {"mae": 0.0, "dbot": full_teacher, "rcmae": enc_visible + decoder,
                   "sdae": _fold_flops(m, masked, params["sdae"]["folds"])}[method]
    return {"student_forward": student, "teacher_forward": teacher, "train": 3 * student + teacher}


def _fold_flops(m: dict, masked: int, folds: int) -> float:
    """SdAE's teacher: `folds` sequences of (masked // folds) + cls tokens each."""
    return folds * m["depth"] * flops_per_token_block(m["embed_dim"], 1 + masked // folds)
