"""Supervised training of the same ViT with labels: the "DeiT-like" teacher of dBOT's teacher-swap study
and a reference line in the report.

The encoder sees the full (augmented) image; a linear head on the cls token after the final norm is
trained with label-smoothed cross-entropy. Not a masked-image-modelling method: the engine passes it the
labels of the batch (`needs_labels`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import flops
from pipeline.models.encoder import Encoder, build_encoder
from pipeline.settings import Geometry

SPEC = {   # plain data, read without importing this module (pipeline.methods.spec)
    "label": "supervised",
    "color": "black",
    "node": "supervised",
    "teacher": None,
    "labels": True,
    "seed_offset": 540,
    "at_most": {},
    "params": {   # JSON schema of params section supervised (every key required)
        "epochs": {"$ref": "#/$defs/posint"},
        "label_smoothing": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
    },
}



class Supervised(nn.Module):
    needs_labels = True

    def __init__(self, encoder: Encoder, num_classes: int, label_smoothing: float, seed: int):
        """encoder: the ViT trained end to end; a Linear head on its cls token (seeded by `seed`) to num_classes."""
        super().__init__()
        self.encoder = encoder
        with torch.random.fork_rng(devices=[]):    # torch seeds its global generator at random at start-up
            torch.manual_seed(seed)
            self.head = nn.Linear(encoder.embed_dim, num_classes)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.label_smoothing = label_smoothing

    def forward(self, imgs: torch.Tensor, generator: torch.Generator, step: int = 0, labels=None):
        """imgs (B, C, H, W) normalised, labels (B,) -> (loss, {"logits": (B, classes)})."""
        logits = self.head(self.encoder.features(imgs, "cls"))
        return F.cross_entropy(logits.float(), labels.to(logits.device), label_smoothing=self.label_smoothing), \
            {"logits": logits}


def forward_flops(params: dict, teacher: dict | None = None) -> tuple[float, float]:
    """(student, teacher) forward FLOPs per image: the encoder on every patch; no teacher."""
    return flops.full_encoder(Geometry.of(params)), 0.0


def build(params: dict, in_chans: int, seed: int, teacher=None, num_classes: int = 10) -> Supervised:
    g = Geometry.of(params)
    encoder = build_encoder(g.model, g.img_size, in_chans, seed)
    return Supervised(encoder, num_classes, params["supervised"]["label_smoothing"], seed + 1)
