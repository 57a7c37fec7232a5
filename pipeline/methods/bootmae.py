"""BootMAE (Dong et al., ECCV 2022): momentum-encoder feature targets and target-aware decoders.

Masking is hybrid: BEiT blocks over `block_ratio` of the patches, topped up randomly to the mask ratio.
Two target-aware decoders read the encoder's output and cross-attend to the student's own features of the
visible patches: the pixel decoder to block 0's output, the feature decoder to the last block's. Targets:
per-patch, per-colour-channel normalised pixels, and the EMA encoder's last-block features of the full
image (before its final norm). Both predictions and feature targets go through a layer norm without affine.
Loss: centre-weighted pixel MSE + w_f * centre-weighted feature MSE, with w_f ramped from 0 to
`feature_weight` over the first `ramp_fraction` of training.
"""
from __future__ import annotations

import torch

from pipeline import losses
from pipeline.decoder import TargetAwareDecoder
from pipeline.ema import EMAMethod, EMASchedule, EMATeacher
from pipeline.encoder import build_encoder
from pipeline.masking import hybrid_masking


class BootMAE(EMAMethod):
    def __init__(self, params: dict, in_chans: int, seed: int):
        super().__init__()
        m, d, cfg = params["model"], params["data"], params["bootmae"]
        self.encoder = build_encoder(m, d["img_size"], in_chans, seed)
        dim = m["embed_dim"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            args = (self.encoder.grid, dim, m["decoder_dim"], m["decoder_depth"], m["decoder_heads"])
            self.pixel_decoder = TargetAwareDecoder(*args, m["patch_size"] ** 2 * in_chans, context_dim=dim)
            self.feature_decoder = TargetAwareDecoder(*args, dim, context_dim=dim)
        self.teacher = EMATeacher(self.encoder)
        self.ema_schedule = EMASchedule(cfg["momentum"])
        self.evaluate_weights = cfg["evaluate_weights"]
        self.cfg, self.patch, self.channels = cfg, m["patch_size"], in_chans
        self.mask_ratio = params["pretrain"]["mask_ratio"]
        self.total_steps = None        # set by start_schedule; without it the feature weight is not ramped

    @property
    def teacher_encoder(self):
        return self.teacher.module

    def ema_source(self):
        return self.encoder

    def evaluated_encoder(self):
        """The student or teacher encoder (evaluate_weights), truncated after block probe_block when it is set
        (the official linear probe reads block 10 of 12)."""
        encoder, block = super().evaluated_encoder(), self.cfg["probe_block"]
        return encoder if block is None else encoder.truncated(block)

    def feature_weight(self, step: int) -> float:
        if self.total_steps is None:
            return self.cfg["feature_weight"]
        return self.cfg["feature_weight"] * losses.ramp(step, self.total_steps, self.cfg["ramp_fraction"])

    def forward(self, imgs: torch.Tensor, generator: torch.Generator, step: int = 0):
        """imgs (B, C, H, W) normalised -> (loss, {"pred", "features", "mask", "pixel_loss", "feature_loss"})."""
        enc, cfg = self.encoder, self.cfg
        mask = hybrid_masking(imgs.shape[0], enc.num_patches, self.mask_ratio, generator, cfg["block_ratio"],
                              cfg["min_block"]).to(imgs.device)
        last = len(enc.vit.blocks) - 1
        latent, blocks = enc(imgs, mask.ids_keep, return_blocks=(0, last))
        pred = self.pixel_decoder(latent, mask.ids_restore, [blocks[0]])[:, 1:]
        features = self.feature_decoder(latent, mask.ids_restore, [blocks[last]])[:, 1:]
        _, teacher_blocks = self.teacher(imgs, return_blocks=(last,))
        target_features = teacher_blocks[last][:, 1:]
        target_pixels = losses.normalize_patches_per_channel(losses.patchify(imgs, self.patch), self.channels)
        weights = losses.center_weights(mask.mask, enc.grid) if cfg["center_weight"] else mask.mask
        pixel_loss = losses.mse(pred, target_pixels, weights)
        feature_loss = losses.mse(losses.standardize_tokens(features), losses.standardize_tokens(target_features),
                                  weights)
        loss = pixel_loss + self.feature_weight(step) * feature_loss
        return loss, {"pred": pred, "features": features, "mask": mask.mask, "pixel_loss": pixel_loss,
                      "feature_loss": feature_loss}

    @torch.no_grad()
    def picture(self, imgs: torch.Tensor, generator: torch.Generator) -> dict:
        """forward's mask and both branches, for pipeline.pictures: the pixel prediction (per-patch, per-channel
        normalised target) and, under "features", the two standardised sides of the feature loss."""
        _, out = self(imgs, generator)
        last = len(self.encoder.vit.blocks) - 1
        target = self.teacher(imgs, return_blocks=(last,))[1][last][:, 1:]
        features = {"kind": "features", "mask": out["mask"], "pred": losses.standardize_tokens(out["features"]),
                    "target": losses.standardize_tokens(target)}
        return {"kind": "pixels", "mask": out["mask"], "pred": out["pred"], "norm_pix": True, "per_channel": True,
                "features": features}


def build(params: dict, in_chans: int, seed: int, teacher=None) -> BootMAE:
    return BootMAE(params, in_chans, seed)
