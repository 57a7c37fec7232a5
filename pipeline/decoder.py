"""The light decoder: visible tokens + mask tokens, fixed sin-cos positions, a few blocks, a head.

The head predicts pixels (MAE: patch_size^2 * channels values per patch) or features (dBOT: the
teacher's width). Output keeps the cls position: (B, 1 + L, out_dim); methods drop it when unused.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from pipeline.encoder import init_mae_weights, sincos_2d


class Decoder(nn.Module):
    def __init__(self, grid: int, in_dim: int, dim: int, depth: int, heads: int, out_dim: int):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", sincos_2d(dim, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)
        init_mae_weights(self)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-6
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1+K, D_enc) encoder output; ids_restore (B, L) -> predictions (B, 1+L, out_dim)."""
        x = self.embed(latent)
        b, k1, d = x.shape
        masks = self.mask_token.expand(b, ids_restore.shape[1] + 1 - k1, -1)
        patches = torch.cat([x[:, 1:], masks], dim=1)                       # shuffled order
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, d))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
