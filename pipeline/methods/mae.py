"""MAE (He et al. 2021): reconstruct the pixels of randomly masked patches from the visible ones.

Target: per-patch normalised pixels (norm_pix_loss); loss: MSE averaged over masked patches only.
Stochastic depth of the encoder in pre-training: `mae.drop_path` (official: none; RC-MAE passes its own).
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.models import flops, losses
from pipeline.models.decoder import Decoder, build_decoder
from pipeline.models.encoder import Encoder, build_encoder
from pipeline.models.masking import Mask, random_masking
from pipeline.settings import Geometry

SPEC = {   # plain data, read without importing this module (pipeline.methods.spec)
    "label": "MAE",
    "color": "tab:orange",
    "node": "pretrain",
    "teacher": None,
    "labels": False,
    "seed_offset": 500,
    "at_most": {},
    "params": {   # JSON schema of params section mae (every key required)
        "norm_pix_loss": {"type": "boolean"},
        "drop_path": {"$ref": "#/$defs/drop_path"},
    },
}



class MAE(nn.Module):
    def __init__(self, encoder: Encoder, decoder: Decoder, mask_ratio: float, norm_pix: bool):
        """encoder: the student (Encoder, on the visible patches); decoder: its light pixel decoder (out_dim
        patch_size^2 * channels); mask_ratio: the share of patches hidden; norm_pix: per-patch normalised targets."""
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.patch = encoder.config["patch_size"]
        self.mask_ratio, self.norm_pix = mask_ratio, norm_pix

    def forward(self, imgs: torch.Tensor, generator: torch.Generator, step: int = 0):
        """imgs (B, C, H, W) normalised -> (loss, {"pred": (B, L, p*p*C), "mask": (B, L)})."""
        mask = random_masking(imgs.shape[0], self.encoder.num_patches, self.mask_ratio,
                              generator).to(imgs.device)
        pred = self.reconstruct(imgs, mask)
        return losses.mse(pred, self.target(imgs), mask.mask), {"pred": pred, "mask": mask.mask}

    def reconstruct(self, imgs: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Predicted pixels of every patch (B, L, p*p*C) from the visible patches of `mask`."""
        return self.decoder(self.encoder(imgs, mask.ids_keep), mask.ids_restore)[:, 1:]   # drop cls

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """The pixel target (B, L, p*p*C): patches, per-patch normalised if norm_pix_loss."""
        target = losses.patchify(imgs, self.patch)
        return losses.normalize_patches(target) if self.norm_pix else target

    @torch.no_grad()
    def picture(self, imgs: torch.Tensor, generator: torch.Generator) -> dict:
        """forward's own mask and prediction, for pipeline.reporting.figures:
        {"kind": "pixels", "mask", "pred", "norm_pix"}."""
        _, out = self(imgs, generator)
        return {"kind": "pixels", "mask": out["mask"], "pred": out["pred"], "norm_pix": self.norm_pix}


def forward_flops(params: dict, teacher: dict | None = None) -> tuple[float, float]:
    """(student, teacher) forward FLOPs per image: the encoder on the visible patches + the decoder; no teacher."""
    g = Geometry.of(params)
    return flops.visible_encoder(g) + flops.pixel_decoder(g), 0.0


def pixel_mae(g: Geometry, in_chans: int, seed: int, drop_path: float, norm_pix: bool) -> MAE:
    """A fresh MAE of the study's geometry: the encoder seeded by `seed`, its decoder by seed + 1."""
    encoder = build_encoder(g.model, g.img_size, in_chans, seed, drop_path=drop_path)
    decoder = build_decoder(encoder, g.model, g.model.patch_size ** 2 * in_chans, seed + 1)
    return MAE(encoder, decoder, g.mask_ratio, norm_pix)


def build(params: dict, in_chans: int, seed: int, teacher=None) -> MAE:
    own = params["mae"]
    return pixel_mae(Geometry.of(params), in_chans, seed, own["drop_path"], own["norm_pix_loss"])
