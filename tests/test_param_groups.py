"""The optimisers' parameter groups, pinned by name: which parameters get weight decay, and each one's lr scale.

Pre-training (engine.make_optimizer) and fine-tuning (finetune.optimizer, MAE's layer decay) both take their groups
from timm.optim (param_groups_weight_decay / param_groups_layer_decay). These expectations were checked against the
hand-written grouping they replaced (engine.param_groups before issue 18, item 4) and guard the project's rules:
no decay on biases, norms and other 1-D parameters, nor on tokens (cls, mask) and learnable positions.
"""
import pytest
import torch
from torch import nn

from pipeline.evaluation import finetune
from pipeline.models.decoder import Decoder
from pipeline.models.encoder import build_encoder
from pipeline.train import engine

MODEL = dict(arch="vit_tiny_patch16_224", patch_size=4, embed_dim=8, depth=2, num_heads=2)
BLOCK_WEIGHTS = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
BLOCK_OTHERS = ("norm1.weight", "norm1.bias", "attn.qkv.bias", "attn.proj.bias", "norm2.weight", "norm2.bias",
                "mlp.fc1.bias", "mlp.fc2.bias")


def mapping(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, tuple[float, float]]:
    """Parameter name -> (weight decay, lr scale) of the group that holds it; frozen parameters are in none."""
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    return {n: (group_of[id(p)]["weight_decay"], group_of[id(p)].get("lr_scale", 1.0))
            for n, p in model.named_parameters() if id(p) in group_of}


class Pretrain(nn.Module):
    """An MAE-like model: the encoder (cls token, frozen sin-cos positions), a mask-token decoder, plus a learnable
    position table and a token of a teacher-like part, and one frozen matrix."""

    def __init__(self):
        super().__init__()
        self.encoder = build_encoder(MODEL, 8, 1, seed=0)
        self.decoder = Decoder(2, 8, 8, 1, 2, 16)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.target_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.frozen = nn.Parameter(torch.zeros(8, 8), requires_grad=False)


def cfg(weight_decay=0.05):
    return engine.TrainConfig(epochs=1, batch_size=2, lr=1e-3, min_lr=0.0, warmup_epochs=0,
                              weight_decay=weight_decay, clip_grad=None, precision="fp32", crop_scale=(1.0, 1.0),
                              hflip=False, checkpoint_every_min=60, seed=0, config_hash="x")


def test_pretraining_decays_exactly_the_weight_matrices():
    model = Pretrain()
    got = mapping(model, engine.make_optimizer(model, cfg()))
    decayed = ({"encoder.vit.patch_embed.proj.weight", "decoder.embed.weight", "decoder.head.weight"}
               | {f"encoder.vit.blocks.{i}.{w}" for i in range(2) for w in BLOCK_WEIGHTS}
               | {f"decoder.blocks.0.{w}" for w in BLOCK_WEIGHTS})
    not_decayed = ({"encoder.vit.cls_token", "decoder.mask_token", "decoder_pos_embed", "target_token",
                    "encoder.vit.patch_embed.proj.bias", "encoder.vit.norm.weight", "encoder.vit.norm.bias",
                    "decoder.embed.bias", "decoder.norm.weight", "decoder.norm.bias", "decoder.head.bias"}
                   | {f"encoder.vit.blocks.{i}.{w}" for i in range(2) for w in BLOCK_OTHERS}
                   | {f"decoder.blocks.0.{w}" for w in BLOCK_OTHERS})
    assert got == {**{n: (0.05, 1.0) for n in decayed}, **{n: (0.0, 1.0) for n in not_decayed}}
    assert "encoder.vit.pos_embed" not in got and "frozen" not in got          # frozen: in no group
    # decayed group first: the order of the states saved before timm's grouping, so they still resume
    assert [g["weight_decay"] for g in engine.make_optimizer(model, cfg()).param_groups] == [0.05, 0.0]


def test_pretraining_without_weight_decay_decays_nothing():
    model = Pretrain()
    got = mapping(model, engine.make_optimizer(model, cfg(weight_decay=0.0)))
    assert set(got.values()) == {(0.0, 1.0)} and set(got) == set(mapping(model, engine.make_optimizer(model, cfg())))


@pytest.mark.parametrize("layer_decay", [0.5, 0.75])
def test_finetuning_layer_decay_and_weight_decay(layer_decay):
    model = finetune.from_encoder(build_encoder(MODEL, 8, 1, seed=0), 10, 0.0, 0)
    got = mapping(model.vit, finetune.optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=layer_decay))
    s = [layer_decay ** (3 - i) for i in range(4)]     # layer 0: cls token, patch embedding; i + 1: block i; 3: head
    expected = {"cls_token": (0.0, s[0]), "patch_embed.proj.weight": (0.05, s[0]), "patch_embed.proj.bias": (0.0, s[0]),
                "fc_norm.weight": (0.0, 1.0), "fc_norm.bias": (0.0, 1.0), "head.weight": (0.05, 1.0),
                "head.bias": (0.0, 1.0)}
    for i in range(2):
        expected |= {f"blocks.{i}.{w}": (0.05, s[i + 1]) for w in BLOCK_WEIGHTS}
        expected |= {f"blocks.{i}.{w}": (0.0, s[i + 1]) for w in BLOCK_OTHERS}
    assert set(got) == set(expected) and "pos_embed" not in got                 # frozen sin-cos positions
    rounded = lambda m: {n: (wd, round(scale, 12)) for n, (wd, scale) in m.items()}
    assert rounded(got) == rounded(expected)
