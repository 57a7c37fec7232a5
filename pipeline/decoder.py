"""The light decoders: visible tokens + mask tokens, fixed sin-cos positions, a few blocks, a head.

The head predicts pixels (MAE: patch_size^2 * channels values per patch) or features (dBOT: the
teacher's width). Output keeps the cls position: (B, 1 + L, out_dim); methods drop it when unused.

`Decoder` is MAE's plain decoder. `TargetAwareDecoder` is BootMAE's: each block also cross-attends to
the student's own intermediate features of the *visible* tokens, so the information they already carry
need not be predicted. Both share the token assembly of `_MaskTokenDecoder`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from pipeline.encoder import init_mae_weights, sincos_2d


class _MaskTokenDecoder(nn.Module):
    """Embedding, mask token, positions, the given blocks, final norm and head, with MAE's init."""

    def __init__(self, grid: int, in_dim: int, dim: int, out_dim: int, blocks: nn.ModuleList):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", sincos_2d(dim, grid)[None], persistent=False)
        self.blocks = blocks
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)
        init_mae_weights(self)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-6
        nn.init.normal_(self.mask_token, std=0.02)

    def tokens(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Embed latent (B, 1+K, D_enc), insert mask tokens, unshuffle to grid order, add positions -> (B, 1+L, dim)."""
        x = self.embed(latent)
        b, k1, d = x.shape
        masks = self.mask_token.expand(b, ids_restore.shape[1] + 1 - k1, -1)
        patches = torch.cat([x[:, 1:], masks], dim=1)                       # shuffled order
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, d))
        return torch.cat([x[:, :1], patches], dim=1) + self.pos


class Decoder(_MaskTokenDecoder):
    def __init__(self, grid: int, in_dim: int, dim: int, depth: int, heads: int, out_dim: int):
        blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth))
        super().__init__(grid, in_dim, dim, out_dim, blocks)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1+K, D_enc) encoder output; ids_restore (B, L) -> predictions (B, 1+L, out_dim)."""
        x = self.tokens(latent, ids_restore)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class CrossAttention(nn.Module):
    """Pre-norm cross-attention sublayer with residual: decoder tokens query projected context tokens.

    The context (B, M, context_dim) is projected to the decoder width and layer-normed (encoder block
    outputs are taken before the encoder's final norm), then gives keys and values.
    """

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"decoder width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.context = nn.Linear(context_dim, dim)
        self.context_norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fused_attn = True            # False: explicit softmax(q k^T / sqrt(d)) v (encoder.attention_kernels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q(self.norm(x)).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
        kv = self.kv(self.context_norm(self.context(context)))
        k, v = kv.reshape(b, context.shape[1], 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)                  # (B, heads, N, d / heads)
        else:
            out = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return x + self.proj(out.transpose(1, 2).reshape(b, n, d))


class TargetAwareBlock(nn.Module):
    """Cross-attention to the context, then a timm Block (self-attention over all tokens + MLP)."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.cross = CrossAttention(dim, heads, context_dim)
        self.block = Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.block(self.cross(x, context))


class TargetAwareDecoder(_MaskTokenDecoder):
    def __init__(self, grid: int, in_dim: int, dim: int, depth: int, heads: int, out_dim: int,
                 context_dim: int):
        blocks = nn.ModuleList(TargetAwareBlock(dim, heads, context_dim) for _ in range(depth))
        super().__init__(grid, in_dim, dim, out_dim, blocks)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                context: list[torch.Tensor]) -> torch.Tensor:
        """latent (B, 1+K, D_enc); ids_restore (B, L); context: `depth` tensors (B, 1+K, context_dim),
        the encoder's block outputs on the visible tokens (block i attends to context[i]; a single
        tensor is shared by every block) -> predictions (B, 1+L, out_dim).

        The context must have exactly the latent's 1+K tokens: features of masked patches would leak
        the target into the decoder.
        """
        if len(context) not in (1, len(self.blocks)):
            raise ValueError(f"context holds {len(context)} tensors; expected 1 or {len(self.blocks)}")
        if any(c.shape[1] != latent.shape[1] for c in context):
            raise ValueError(f"context must hold the {latent.shape[1]} visible (+cls) tokens of the latent, "
                             f"got {[c.shape[1] for c in context]}")
        contexts = context * len(self.blocks) if len(context) == 1 else context
        x = self.tokens(latent, ids_restore)
        for block, ctx in zip(self.blocks, contexts):
            x = block(x, ctx)
        return self.head(self.norm(x))
