"""Teachers: networks whose outputs are the student's targets. They never receive gradients.

FrozenTeacher (dBOT): a fixed snapshot, either a random initialisation, the previous stage's student,
or any compatible checkpoint. It sees the full image; its target is the last block's output, before
(or, as an option, after) the final norm. A teacher of depth 0 (dbot.stage0_teacher_depth: the official ViT-L/H
stage-0 teacher, dbot PRETRAIN.md:37) has no block: its target is the embedded tokens, cls + patch embeddings
+ positions (dbot models_mae.py:196-211, forward_teacher with an empty block list). It always runs in eval
mode under inference_mode, so a teacher never drops paths.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.models.encoder import Encoder


def no_graph():
    """The context a teacher runs in: inference_mode (no autograd bookkeeping at all), except while torch.compile
    traces the forward (launch.compile), which cannot trace inference tensors: there no_grad, the same math."""
    return torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode()


class FrozenTeacher(nn.Module):
    def __init__(self, encoder: Encoder, final_norm: bool = False):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.final_norm = final_norm
        self.width = encoder.embed_dim

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)   # always in eval mode, whatever the student does

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) full image -> (B, 1+L, D_teacher) features, as a normal (non-inference) tensor."""
        depth = len(self.encoder.vit.blocks)
        with no_graph():
            if depth == 0:                                   # the embedded tokens (B, 1+L, D)
                tokens = self.encoder.embed(x)
                out = self.encoder.vit.norm(tokens) if self.final_norm else tokens
            else:
                normed, blocks = self.encoder(x, return_blocks=(-1,))
                out = normed if self.final_norm else blocks[depth - 1]
        return out.clone()
