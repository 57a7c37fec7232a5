"""dBOT (Liu et al., ICLR 2024): masked feature distillation from bootstrapped teachers.

One stage: a freshly initialised student (MAE encoder on visible tokens + decoder with a feature head)
regresses a frozen teacher's last-block features of the full image, per-token standardised, with
smooth-L1 (beta 2) over the masked tokens and the cls token. Stage 0's teacher is a copy of a random
initialisation; stage k's teacher is stage k-1's student (made by the teacher_swap node).
The student drops paths in its encoder (`drop_path`) and decoder (`decoder_drop_path`), both 0.2 as the official
recipe (dbot PRETRAIN.md:20 --sdpr 0.2; models_mae.py:50 and :65-66 apply it to both); the teacher none (--tdpr 0,
main_pretrain.py:61: it runs in eval mode).
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.models import flops, losses
from pipeline.models.decoder import Decoder, build_decoder
from pipeline.models.encoder import Encoder, build_encoder
from pipeline.models.masking import random_masking
from pipeline.models.teacher import FrozenTeacher
from pipeline.settings import Geometry

SPEC = {   # plain data, read without importing this module (pipeline.methods.spec)
    "label": "dBOT",
    "color": "tab:blue",
    "node": "pretrain_dbot",
    "teacher": "frozen",
    "labels": False,
    "seed_offset": None,
    "at_most": {},
    "params": {   # JSON schema of params section dbot (every key required)
        "beta": {"$ref": "#/$defs/posnum"},
        "target_norm": {"type": "boolean"},
        "teacher_final_norm": {"type": "boolean"},
        "drop_path": {"$ref": "#/$defs/drop_path"},
        "decoder_drop_path": {"$ref": "#/$defs/drop_path"},
        "carry_optimizer_state": {"type": "boolean"},
        "stage0_teacher_depth": {"oneOf": [{"type": "null"}, {"type": "integer", "minimum": 0}]},
        "chains": {"type": "object", "minProperties": 1, "propertyNames": {"pattern": "^[a-z0-9]+$"},
                   "additionalProperties": {"type": "string", "minLength": 1}},
        "stages": {"type": "object", "minProperties": 1, "propertyNames": {"pattern": "^stage[0-9]+$"},
                   "additionalProperties": {"$ref": "#/$defs/stage"}},
    },
}



class DBOT(nn.Module):
    def __init__(self, encoder: Encoder, decoder: Decoder, teacher: FrozenTeacher, mask_ratio: float, beta: float,
                 target_norm: bool):
        """encoder: the student; decoder: predicts the teacher's features (out_dim its width) of every token;
        beta: the smooth-L1 loss's; target_norm: standardise the teacher's tokens first."""
        super().__init__()
        self.encoder, self.decoder, self.teacher = encoder, decoder, teacher
        self.mask_ratio = mask_ratio
        self.beta = beta
        self.target_norm = target_norm

    def forward(self, imgs: torch.Tensor, generator: torch.Generator, step: int = 0):
        """imgs (B, C, H, W) normalised -> (loss, {"pred": (B, 1+L, D_t), "mask": (B, L)})."""
        mask = random_masking(imgs.shape[0], self.encoder.num_patches, self.mask_ratio,
                              generator).to(imgs.device)
        target = self.teacher.targets(imgs)                              # (B, 1+L, D_t)
        if self.target_norm:
            target = losses.standardize_tokens(target)
        pred = self.decoder(self.encoder(imgs, mask.ids_keep), mask.ids_restore)
        loss = losses.smooth_l1(pred, target, losses.with_cls(mask.mask), self.beta)
        return loss, {"pred": pred, "mask": mask.mask}

    @torch.no_grad()
    def picture(self, imgs: torch.Tensor, generator: torch.Generator) -> dict:
        """forward's mask, prediction and the teacher's (standardised) targets of the patch tokens, for
        pipeline.reporting.figures: {"kind": "features", "mask", "pred", "target"} (the cls token is left out)."""
        _, out = self(imgs, generator)
        target = self.teacher.targets(imgs)
        if self.target_norm:
            target = losses.standardize_tokens(target)
        return {"kind": "features", "mask": out["mask"], "pred": out["pred"][:, 1:], "target": target[:, 1:]}


def forward_flops(params: dict, teacher: dict | None = None) -> tuple[float, float]:
    """(student, teacher) forward FLOPs per image: MAE's student; the frozen teacher (`teacher`: its model config
    when it differs from the student's) on every patch."""
    g = Geometry.of(params)
    return flops.visible_encoder(g) + flops.pixel_decoder(g), flops.full_encoder(g, teacher)


def build(params: dict, in_chans: int, seed: int, teacher: FrozenTeacher | None = None) -> DBOT:
    if teacher is None:
        raise ValueError("dbot needs a teacher (made by the teacher_swap node)")
    own, g = params["dbot"], Geometry.of(params)
    encoder = build_encoder(g.model, g.img_size, in_chans, seed, drop_path=own["drop_path"])
    decoder = build_decoder(encoder, g.model, teacher.width, seed + 1, drop_path=own["decoder_drop_path"])
    return DBOT(encoder, decoder, teacher, g.mask_ratio, own["beta"], own["target_norm"])
