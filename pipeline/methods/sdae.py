"""SdAE (Chen et al., ECCV 2022): self-distilled MAE with multi-fold masking.

The student (MAE encoder on the visible patches + a decoder with a feature head) predicts an EMA
teacher's features of the masked patches. The teacher never sees the visible patches: the masked set
is split into `folds` disjoint folds, each run as its own sequence (+cls); its targets are the final-norm
outputs, per-token standardised. Loss: 1 - cosine (per token across channels, or the official code's
cosine across the tokens of a fold: `cosine_axis`). The EMA follows the student encoder once per epoch
by default; the teacher starts from its own random init (as the code) or from a copy of the student.
The official teacher is a timm ViT with timm's own init and learnable positions (sdae models_teacher.py:20-24,
:42; timm pinned at 0.3.2, main_pretrain.py:27): teacher_init "random" builds it so (seed + 2), not with MAE's
init and sin-cos positions. The student's encoder drops paths (`drop_path` 0.25, main_pretrain.py:94, in the
encoder only: models_mae.py:39); the teacher none (drop_path_rate 0, main_pretrain.py:218; it runs in eval mode).
"""
from __future__ import annotations

import torch

from pipeline.models import flops, losses
from pipeline.models.decoder import Decoder, build_decoder
from pipeline.models.ema import EMAMethod, EMASchedule, EMATeacher
from pipeline.models.encoder import Encoder, build_encoder, flops_per_token_block
from pipeline.models.masking import multifold_split, random_masking
from pipeline.settings import Geometry

SPEC = {   # plain data, read without importing this module (pipeline.methods.spec)
    "label": "SdAE",
    "color": "tab:green",
    "node": "pretrain",
    "teacher": "ema",
    "labels": False,
    "seed_offset": 510,
    "at_most": {"folds": "masked_patches"},
    "params": {   # JSON schema of params section sdae (every key required)
        "folds": {"$ref": "#/$defs/posint"},
        "teacher_init": {"enum": ["random", "student"]},
        "cosine_axis": {"enum": ["channels", "tokens"]},
        "momentum": {"$ref": "#/$defs/momentum"},
        "evaluate_weights": {"$ref": "#/$defs/evaluate_weights"},
        "drop_path": {"$ref": "#/$defs/drop_path"},
    },
}



class SdAE(EMAMethod):
    def __init__(self, encoder: Encoder, decoder: Decoder, teacher: EMATeacher, momentum: EMASchedule,
                 evaluate_weights: str, mask_ratio: float, folds: int, cosine_axis: str):
        """encoder: the student; decoder: its feature decoder (out_dim the encoder's width); teacher: the EMA of
        the encoder; folds: disjoint folds of the masked set, each a teacher sequence; cosine_axis: channels |
        tokens (the loss, see the module doc)."""
        super().__init__()
        self.encoder, self.decoder, self.teacher = encoder, decoder, teacher
        self.ema_schedule = momentum
        self.evaluate_weights = evaluate_weights
        self.mask_ratio = mask_ratio
        self.folds, self.cosine_axis = folds, cosine_axis

    @property
    def teacher_encoder(self):
        return self.teacher.module

    def ema_source(self):
        return self.encoder

    def forward(self, imgs: torch.Tensor, generator: torch.Generator, step: int = 0):
        """imgs (B, C, H, W) normalised -> (loss, {"pred": (B*F, n, D), "mask": (B, L), "folds": (B, F, n)})."""
        mask = random_masking(imgs.shape[0], self.encoder.num_patches, self.mask_ratio, generator).to(imgs.device)
        folds = multifold_split(mask, self.folds, generator).to(imgs.device)          # (B, F, n)
        b, f, n = folds.shape
        target = self.teacher(imgs.repeat_interleave(f, dim=0), folds.flatten(0, 1))[:, 1:]   # (B*F, n, D)
        target = losses.standardize_tokens(target)
        pred = self.decoder(self.encoder(imgs, mask.ids_keep), mask.ids_restore)[:, 1:]        # (B, L, D)
        pred = torch.gather(pred, 1, folds.view(b, f * n, 1).expand(-1, -1, pred.shape[-1]))
        pred = pred.view(b * f, n, -1)                                         # the teacher's fold layout
        loss = losses.cosine_loss(pred, target, torch.ones(b * f, n, device=imgs.device), self.cosine_axis)
        return loss, {"pred": pred, "mask": mask.mask, "folds": folds}

    @torch.no_grad()
    def picture(self, imgs: torch.Tensor, generator: torch.Generator) -> dict:
        """forward's mask, and on the patch grid the (standardised) predictions and the EMA teacher's targets of
        the masked patches its folds cover, for pipeline.reporting.figures. Tokens without a target (the visible ones,
        which the teacher never sees, and a dropped remainder) are NaN in both."""
        _, out = self(imgs, generator)
        folds = out["folds"]
        b, f, n = folds.shape
        target = self.teacher(imgs.repeat_interleave(f, dim=0), folds.flatten(0, 1))[:, 1:]
        ids = folds.reshape(b, f * n, 1).expand(-1, -1, target.shape[-1])
        on_grid = lambda x: torch.full((b, out["mask"].shape[1], x.shape[-1]), float("nan"), device=x.device,
                                       dtype=x.dtype).scatter(1, ids, x.reshape(b, f * n, -1))
        return {"kind": "features", "mask": out["mask"], "pred": on_grid(losses.standardize_tokens(out["pred"])),
                "target": on_grid(losses.standardize_tokens(target))}


def forward_flops(params: dict, teacher: dict | None = None) -> tuple[float, float]:
    """(student, teacher) forward FLOPs per image: MAE's student; the teacher runs `folds` sequences of
    (masked // folds) + cls tokens each."""
    g, folds = Geometry.of(params), params["sdae"]["folds"]
    masked = flops.token_counts(g)[2]
    teacher_forward = folds * g.model.depth * flops_per_token_block(g.model.embed_dim, 1 + masked // folds)
    return flops.visible_encoder(g) + flops.pixel_decoder(g), teacher_forward


def build(params: dict, in_chans: int, seed: int, teacher=None) -> SdAE:
    own, g = params["sdae"], Geometry.of(params)
    encoder = build_encoder(g.model, g.img_size, in_chans, seed, drop_path=own["drop_path"])
    decoder = build_decoder(encoder, g.model, g.model.embed_dim, seed + 1)
    if own["teacher_init"] == "random":     # its own random timm init, as the official code
        ema = EMATeacher(encoder, "random", build_encoder(g.model, g.img_size, in_chans, seed + 2, init="timm"))
    else:                                    # "student": a copy of the student
        ema = EMATeacher(encoder, "copy")
    return SdAE(encoder, decoder, ema, EMASchedule(own["momentum"]), own["evaluate_weights"], g.mask_ratio,
                own["folds"], own["cosine_axis"])
