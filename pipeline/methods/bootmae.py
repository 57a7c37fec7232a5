"""BootMAE (Dong et al., ECCV 2022): momentum-encoder feature targets and target-aware decoders.

Masking is hybrid: BEiT blocks (each at most `max_block` of the patches, redrawn until exactly
`block_ratio` of them are hidden) topped up randomly to the mask ratio. Two target-aware decoders read the
encoder's output and cross-attend to the student's own features of the visible patches: the pixel decoder
(model.decoder_dim) to block 0's output, the feature decoder to the last block's. Targets: per-patch,
per-colour-channel normalised pixels, and the EMA encoder's last-block features of the full image (before
its final norm). Both predictions and feature targets go through a layer norm without affine. Loss:
centre-weighted pixel MSE + w_f * centre-weighted feature MSE, each divided by the number of masked tokens,
with w_f ramped per epoch.

The defaults follow the official code, LightDXY/BootMAE at commit f9512008 (params/base.yaml `bootmae`
cites file:line for each; the earlier choices stay as options):
- feature decoder at the encoder's width and heads, its own projection and mask token, the encoder's position
  embedding on its mask tokens (modeling_pretrain_bootmae.py:L341-353, L492-495): `feature_decoder`;
- decoder positions on the mask tokens only (L481-484, L492-495): `decoder_positions`;
- block = self-attention, cross-attention to LayerNorm(context), MLP (L153-157): `block_order`;
- loss / number of masked tokens (run_pretraining.py:L450, L459): `loss_denominator`;
- blocks capped at 60 of 196 patches and redrawn to the exact count (run_pretraining.py:L67,
  masking_generator.py:L58, L83-85): `max_block`, `block_attempts`;
- EMA decay 0.999 -> 0.9999 over the first 100 epochs, then -> 0.99999 by epoch 400 (utils.py:L586-593):
  `momentum.schedule: piecewise`;
- w_f = min(4 w (e + 1) / E, w) per epoch (run_pretraining.py:L386-387): `ramp: epoch`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from pipeline.models import flops, losses
from pipeline.models.decoder import TargetAwareDecoder
from pipeline.models.ema import EMAMethod, EMASchedule, EMATeacher
from pipeline.models.encoder import Encoder, build_encoder, encoder_flops
from pipeline.models.masking import hybrid_masking, max_block_patches
from pipeline.settings import Geometry

SPEC = {   # plain data, read without importing this module (pipeline.methods.spec)
    "label": "BootMAE",
    "color": "tab:purple",
    "node": "pretrain",
    "teacher": "ema",
    "labels": False,
    "seed_offset": 530,
    "at_most": {"probe_block": "model.depth"},
    "params": {   # JSON schema of params section bootmae (every key required)
        "feature_weight": {"type": "number", "minimum": 0},
        "ramp": {"enum": ["epoch", "step"]},
        "ramp_fraction": {"type": "number", "minimum": 0, "maximum": 1},
        "block_ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "min_block": {"$ref": "#/$defs/posint"},
        "max_block": {"oneOf": [{"type": "null"}, {"type": "number", "exclusiveMinimum": 0, "maximum": 1}]},
        "block_attempts": {"oneOf": [{"type": "null"}, {"$ref": "#/$defs/posint"}]},
        "center_weight": {"type": "boolean"},
        "loss_denominator": {"enum": ["masked", "weights"]},
        "feature_decoder": {"enum": ["encoder", "decoder"]},
        "decoder_positions": {"enum": ["masked", "all"]},
        "block_order": {"enum": ["self_cross_mlp", "cross_self_mlp"]},
        "momentum": {"$ref": "#/$defs/momentum"},
        "evaluate_weights": {"$ref": "#/$defs/evaluate_weights"},
        "probe_block": {"oneOf": [{"type": "null"}, {"$ref": "#/$defs/posint"}]},
        "drop_path": {"$ref": "#/$defs/drop_path"},
    },
    "optional": {   # absent: the study's model.decoder_depth (the official ViT-B: 2 blocks each, preset imagenet)
        "decoder_depth": {"$ref": "#/$defs/posint"},
    },
}



@dataclass(frozen=True)
class Options:
    """What BootMAE's steps read of params bootmae (params/base.yaml says what each does)."""
    feature_weight: float           # w_f: loss = pixel loss + w_f * feature loss
    ramp: str                       # epoch | step: how w_f rises
    ramp_fraction: float            # the share of training w_f takes to reach feature_weight
    block_ratio: float              # share of patches hidden in BEiT blocks
    min_block: int                  # smallest block, in patches
    max_block: float | None         # largest block, as a share of the patches
    block_attempts: int | None      # None: blocks are redrawn until block_ratio is reached
    center_weight: bool             # weight each masked patch by its nearness to the visible ones
    loss_denominator: str           # masked | weights
    probe_block: int | None         # the evaluated encoder ends after this block; None = every block

    @classmethod
    def of(cls, section: dict) -> Options:
        return cls(**{f.name: section[f.name] for f in fields(cls)})


class BootMAE(EMAMethod):
    def __init__(self, encoder: Encoder, pixel_decoder: TargetAwareDecoder, feature_decoder: TargetAwareDecoder,
                 momentum: EMASchedule, evaluate_weights: str, mask_ratio: float, options: Options):
        """encoder: the student; pixel_decoder and feature_decoder: its two target-aware decoders (pixels of a
        patch; the EMA teacher's features at the encoder's width); the teacher is the encoder's EMA."""
        super().__init__()
        self.encoder = encoder
        self.pixel_decoder, self.feature_decoder = pixel_decoder, feature_decoder
        self.teacher = EMATeacher(self.encoder)
        self.ema_schedule = momentum
        self.evaluate_weights = evaluate_weights
        self.cfg, self.patch, self.channels = options, encoder.config["patch_size"], encoder.config["in_chans"]
        self.mask_ratio = mask_ratio
        self.max_block = max_block_patches(options.max_block, encoder.num_patches)
        self.total_steps = None        # set by start_schedule; without it the feature weight is not ramped
        self.steps_per_epoch = None

    @property
    def teacher_encoder(self):
        return self.teacher.module

    def ema_source(self):
        return self.encoder

    def evaluated_encoder(self):
        """The student or teacher encoder (evaluate_weights), truncated after block probe_block when it is set
        (the official linear probe reads block 10 of 12)."""
        encoder, block = super().evaluated_encoder(), self.cfg.probe_block
        return encoder if block is None else encoder.truncated(block)

    def start_schedule(self, steps_per_epoch: int, total_steps: int) -> None:
        super().start_schedule(steps_per_epoch, total_steps)
        self.steps_per_epoch = steps_per_epoch

    def feature_weight(self, step: int) -> float:
        """w_f at optimiser step `step`: ramp "epoch" min(w (e + 1) / (ramp_fraction E), w) for the step's epoch
        e of E (official: run_pretraining.py:L386-387), ramp "step" linear from 0 over ramp_fraction of the steps."""
        cfg = self.cfg
        if self.total_steps is None:
            return cfg.feature_weight
        if cfg.ramp == "epoch":
            return losses.epoch_ramp(step // self.steps_per_epoch, self.total_steps // self.steps_per_epoch,
                                     cfg.ramp_fraction, end=cfg.feature_weight)
        return cfg.feature_weight * losses.ramp(step, self.total_steps, cfg.ramp_fraction)

    def forward(self, imgs: torch.Tensor, generator: torch.Generator, step: int = 0):
        """imgs (B, C, H, W) normalised -> (loss, {"pred", "features", "mask", "pixel_loss", "feature_loss"})."""
        enc, cfg = self.encoder, self.cfg
        mask = hybrid_masking(imgs.shape[0], enc.num_patches, self.mask_ratio, generator, cfg.block_ratio,
                              cfg.min_block, self.max_block, cfg.block_attempts).to(imgs.device)
        last = len(enc.vit.blocks) - 1
        latent, blocks = enc(imgs, mask.ids_keep, return_blocks=(0, last))
        pred = self.pixel_decoder(latent, mask.ids_restore, [blocks[0]])[:, 1:]
        features = self.feature_decoder(latent, mask.ids_restore, [blocks[last]])[:, 1:]
        _, teacher_blocks = self.teacher(imgs, return_blocks=(last,))
        target_features = teacher_blocks[last][:, 1:]
        target_pixels = losses.normalize_patches_per_channel(losses.patchify(imgs, self.patch), self.channels)
        weights = losses.center_weights(mask.mask, enc.grid) if cfg.center_weight else mask.mask
        count = mask.mask if cfg.loss_denominator == "masked" else None    # None: the sum of the weights
        pixel_loss = losses.mse(pred, target_pixels, weights, count)
        feature_loss = losses.mse(losses.standardize_tokens(features), losses.standardize_tokens(target_features),
                                  weights, count)
        loss = pixel_loss + self.feature_weight(step) * feature_loss
        return loss, {"pred": pred, "features": features, "mask": mask.mask, "pixel_loss": pixel_loss,
                      "feature_loss": feature_loss}

    @torch.no_grad()
    def picture(self, imgs: torch.Tensor, generator: torch.Generator) -> dict:
        """forward's mask and both branches, for pipeline.reporting.figures: the pixel prediction (per-patch,
        per-channel normalised target) and, under "features", the two standardised sides of the feature loss."""
        _, out = self(imgs, generator)
        last = len(self.encoder.vit.blocks) - 1
        target = self.teacher(imgs, return_blocks=(last,))[1][last][:, 1:]
        features = {"kind": "features", "mask": out["mask"], "pred": losses.standardize_tokens(out["features"]),
                    "target": losses.standardize_tokens(target)}
        return {"kind": "pixels", "mask": out["mask"], "pred": out["pred"], "norm_pix": True, "per_channel": True,
                "features": features}


def decoder_depth(own: dict, g: Geometry) -> int:
    """Blocks of each decoder: bootmae.decoder_depth where set (official ViT-B: 2), else model.decoder_depth."""
    return own["decoder_depth"] if "decoder_depth" in own else g.model.decoder_depth


def forward_flops(params: dict, teacher: dict | None = None) -> tuple[float, float]:
    """(student, teacher) forward FLOPs per image: the encoder on the visible patches, a pixel decoder at
    decoder_dim and a feature decoder at embed_dim (or decoder_dim), each with its cross-attention to the
    encoder's tokens; the momentum encoder on every patch."""
    own, g = params["bootmae"], Geometry.of(params)
    m, depth = g.model, decoder_depth(own, g)
    num, visible, _ = flops.token_counts(g)
    project = own["block_order"] == "cross_self_mlp"
    student = flops.visible_encoder(g)
    for dim in (m.decoder_dim, m.embed_dim if own["feature_decoder"] == "encoder" else m.decoder_dim):
        student += encoder_flops(dim, depth, 1 + num) + flops.cross_attention_flops(
            dim, depth, 1 + num, 1 + visible, m.embed_dim, project)
    return student, flops.full_encoder(g)


def build(params: dict, in_chans: int, seed: int, teacher=None) -> BootMAE:
    own, g = params["bootmae"], Geometry.of(params)
    m, depth = g.model, decoder_depth(own, g)
    encoder = build_encoder(m, g.img_size, in_chans, seed, drop_path=own["drop_path"])
    shared = dict(context_dim=m.embed_dim, order=own["block_order"], positions=own["decoder_positions"])
    if own["feature_decoder"] == "encoder":     # the encoder's width, heads and (frozen) sin-cos positions
        feature = dict(dim=m.embed_dim, heads=m.num_heads, pos=encoder.vit.pos_embed[0])
    else:
        feature = dict(dim=m.decoder_dim, heads=m.decoder_heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        pixel = TargetAwareDecoder(encoder.grid, m.embed_dim, m.decoder_dim, depth, m.decoder_heads,
                                   m.patch_size ** 2 * in_chans, **shared)
        features = TargetAwareDecoder(encoder.grid, m.embed_dim, feature.pop("dim"), depth, feature.pop("heads"),
                                      m.embed_dim, **shared, **feature)
    return BootMAE(encoder, pixel, features, EMASchedule(own["momentum"]), own["evaluate_weights"], g.mask_ratio,
                   Options.of(own))
