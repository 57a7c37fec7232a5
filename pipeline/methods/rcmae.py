"""RC-MAE (Lee et al., ICLR 2023): MAE with a mean teacher that reconstructs the same masked image.

The teacher is an EMA of the whole MAE (encoder + decoder), started as a copy of the student. It sees
the student's own mask; its pixel reconstruction is a second target: loss = MAE loss + gamma *
MSE(student, teacher reconstruction) over the masked patches. `evaluate_weights` picks which encoder
the node writes (the official code probes and fine-tunes the teacher).
"""
from __future__ import annotations

import torch

from pipeline.methods.mae import MAE, pixel_mae
from pipeline.models import flops, losses
from pipeline.models.ema import EMAMethod, EMASchedule, EMATeacher
from pipeline.models.masking import random_masking
from pipeline.settings import Geometry

SPEC = {   # plain data, read without importing this module (pipeline.methods.spec)
    "label": "RC-MAE",
    "color": "tab:red",
    "node": "pretrain",
    "teacher": "ema",
    "labels": False,
    "seed_offset": 520,
    "at_most": {},
    "params": {   # JSON schema of params section rcmae (every key required)
        "consistency_weight": {"type": "number", "minimum": 0},
        "momentum": {"$ref": "#/$defs/momentum"},
        "evaluate_weights": {"$ref": "#/$defs/evaluate_weights"},
        "drop_path": {"$ref": "#/$defs/drop_path"},
    },
}



class RCMAE(EMAMethod):
    def __init__(self, student: MAE, momentum: EMASchedule, consistency_weight: float, evaluate_weights: str):
        """student: an MAE (the teacher, its EMA copy, runs in eval mode); consistency_weight: gamma;
        evaluate_weights: which encoder the node writes, student | teacher."""
        super().__init__()
        self.student = student
        self.teacher = EMATeacher(self.student)
        self.ema_schedule = momentum
        self.gamma = consistency_weight
        self.evaluate_weights = evaluate_weights

    @property
    def encoder(self):
        return self.student.encoder

    @property
    def teacher_encoder(self):
        return self.teacher.module.encoder

    def ema_source(self):
        return self.student

    def forward(self, imgs: torch.Tensor, generator: torch.Generator, step: int = 0):
        """imgs (B, C, H, W) normalised -> (loss, {"pred", "mask", "mae_loss", "consistency_loss"})."""
        mask = random_masking(imgs.shape[0], self.encoder.num_patches, self.student.mask_ratio,
                              generator).to(imgs.device)
        pred = self.student.reconstruct(imgs, mask)
        teacher_pred = self.teacher.call("reconstruct", imgs, mask)           # the same mask (RC-MAE-S)
        mae_loss = losses.mse(pred, self.student.target(imgs), mask.mask)
        consistency = losses.mse(pred, teacher_pred, mask.mask)
        return mae_loss + self.gamma * consistency, {"pred": pred, "mask": mask.mask, "mae_loss": mae_loss,
                                                     "consistency_loss": consistency}

    @torch.no_grad()
    def picture(self, imgs: torch.Tensor, generator: torch.Generator) -> dict:
        """forward's mask and the student's reconstruction, for pipeline.reporting.figures (the pixel target is
        MAE's)."""
        _, out = self(imgs, generator)
        return {"kind": "pixels", "mask": out["mask"], "pred": out["pred"], "norm_pix": self.student.norm_pix}


def forward_flops(params: dict, teacher: dict | None = None) -> tuple[float, float]:
    """(student, teacher) forward FLOPs per image: MAE's student, and the EMA teacher runs the same MAE."""
    g = Geometry.of(params)
    mae = flops.visible_encoder(g) + flops.pixel_decoder(g)
    return mae, mae


def build(params: dict, in_chans: int, seed: int, teacher=None) -> RCMAE:
    own = params["rcmae"]      # the student is MAE with MAE's pixel loss (mae.norm_pix_loss) and its own drop_path
    student = pixel_mae(Geometry.of(params), in_chans, seed, own["drop_path"], params["mae"]["norm_pix_loss"])
    return RCMAE(student, EMASchedule(own["momentum"]), own["consistency_weight"], own["evaluate_weights"])
