"""The light decoders: visible tokens + mask tokens, fixed sin-cos positions, a few blocks, a head.

The head predicts pixels (MAE: patch_size^2 * channels values per patch) or features (dBOT: the
teacher's width). Output keeps the cls position: (B, 1 + L, out_dim); methods drop it when unused.

`Decoder` is MAE's plain decoder. `TargetAwareDecoder` is BootMAE's: each block also cross-attends to
the student's own intermediate features of the *visible* tokens, so the information they already carry
need not be predicted. Both share the token assembly of `_MaskTokenDecoder`.

Citations `modeling_pretrain_bootmae.py:L<n>` are to LightDXY/BootMAE at commit f9512008.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from pipeline.models.encoder import Encoder, init_mae_weights, sincos_2d, use_step_drop_path
from pipeline.settings import Model


class _MaskTokenDecoder(nn.Module):
    """Embedding, mask token, positions, the given blocks, final norm and head, with MAE's init.

    positions: "all" adds the fixed positions to every token (MAE's decoder); "masked" adds them to the mask
    tokens only, the visible tokens carrying the encoder's (BootMAE, modeling_pretrain_bootmae.py:L481-484
    and L492-495). pos: the (1 + L, dim) positions to use; default the sin-cos of the decoder's width (BootMAE's
    feature decoder passes the encoder's position embedding, L492).
    """

    def __init__(self, grid: int, in_dim: int, dim: int, out_dim: int, blocks: nn.ModuleList,
                 positions: str = "all", pos: torch.Tensor | None = None):
        super().__init__()
        if positions not in ("all", "masked"):
            raise ValueError(f"decoder positions must be 'all' or 'masked', got {positions!r}")
        pos = sincos_2d(dim, grid) if pos is None else pos.detach().reshape(1 + grid * grid, dim).clone()
        self.positions = positions
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", pos[None], persistent=False)
        self.blocks = blocks
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)
        init_mae_weights(self)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-6
        nn.init.normal_(self.mask_token, std=0.02)

    def tokens(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Embed latent (B, 1+K, D_enc), insert mask tokens, unshuffle to grid order, add positions (to all
        tokens, or to the mask tokens only) -> (B, 1+L, dim)."""
        x = self.embed(latent)
        b, k1, d = x.shape
        masks = self.mask_token.expand(b, ids_restore.shape[1] + 1 - k1, -1)
        if self.positions == "masked":                # the hidden patches' indices, in the mask tokens' order
            hidden = torch.argsort(ids_restore, dim=1)[:, k1 - 1:]
            masks = masks + torch.gather(self.pos[:, 1:].expand(b, -1, -1), 1, hidden[..., None].expand(-1, -1, d))
        patches = torch.cat([x[:, 1:], masks], dim=1)                       # shuffled order
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, d))
        x = torch.cat([x[:, :1], patches], dim=1)
        return x + self.pos if self.positions == "all" else x


class Decoder(_MaskTokenDecoder):
    def __init__(self, grid: int, in_dim: int, dim: int, depth: int, heads: int, out_dim: int, drop_path: float = 0.0):
        """drop_path: stochastic depth rising linearly 0 -> drop_path over the blocks (dBOT's decoder: dbot
        models_mae.py:65-66), drawn as pipeline.models.encoder.DropPath (from the training step's generator)."""
        rates = torch.linspace(0, drop_path, depth).tolist()
        blocks = use_step_drop_path(nn.ModuleList(
            Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm, drop_path=r) for r in rates))
        super().__init__(grid, in_dim, dim, out_dim, blocks)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1+K, D_enc) encoder output; ids_restore (B, L) -> predictions (B, 1+L, out_dim)."""
        x = self.tokens(latent, ids_restore)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_decoder(encoder: Encoder, model: Model, out_dim: int, seed: int, drop_path: float = 0.0) -> Decoder:
    """A fresh Decoder of `model`'s decoder sizes after `encoder`, predicting `out_dim` values per token (pixels of a
    patch, or a teacher's features); the same seed gives bit-identical weights (a method's: its node seed + 1)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Decoder(encoder.grid, encoder.embed_dim, model.decoder_dim, model.decoder_depth, model.decoder_heads,
                       out_dim, drop_path=drop_path)


class CrossAttention(nn.Module):
    """Pre-norm cross-attention sublayer with residual: decoder tokens query the context tokens.

    The context (B, M, context_dim) is an encoder block's output (before the encoder's final norm).
    project_context False (BootMAE's, modeling_pretrain_bootmae.py:L140 and L156, Cross_Attention L72-121):
    the context is layer-normed at its own width, then one Linear(context_dim, 2 dim) gives keys and values.
    project_context True: it is first projected to the decoder width (Linear), layer-normed there, then
    Linear(dim, 2 dim) gives keys and values.
    """

    def __init__(self, dim: int, heads: int, context_dim: int, project_context: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"decoder width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        kv_in = dim if project_context else context_dim
        self.context = nn.Linear(context_dim, dim) if project_context else nn.Identity()
        self.context_norm = nn.LayerNorm(kv_in)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_in, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fused_attn = True            # False: explicit softmax(q k^T / sqrt(d)) v (hardware.attention_kernels)

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


BLOCK_ORDERS = ("self_cross_mlp", "cross_self_mlp")


class TargetAwareBlock(nn.Module):
    """A decoder block that also cross-attends to the context, each sublayer pre-norm with a residual.

    order "self_cross_mlp" (BootMAE's Decode_Block, modeling_pretrain_bootmae.py:L153-157): self-attention
    over all tokens, cross-attention to LayerNorm(context), MLP. order "cross_self_mlp": cross-attention to the
    projected, then layer-normed context first, then a whole timm Block (self-attention + MLP).
    """

    def __init__(self, dim: int, heads: int, context_dim: int, order: str = "self_cross_mlp"):
        super().__init__()
        if order not in BLOCK_ORDERS:
            raise ValueError(f"unknown target-aware block order {order!r}; known: {', '.join(BLOCK_ORDERS)}")
        self.order = order
        self.cross = CrossAttention(dim, heads, context_dim, project_context=order == "cross_self_mlp")
        self.block = Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.order == "cross_self_mlp":
            return self.block(self.cross(x, context))
        b = self.block
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        x = self.cross(x, context)
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


class TargetAwareDecoder(_MaskTokenDecoder):
    def __init__(self, grid: int, in_dim: int, dim: int, depth: int, heads: int, out_dim: int,
                 context_dim: int, order: str = "self_cross_mlp", positions: str = "masked",
                 pos: torch.Tensor | None = None):
        """order: see TargetAwareBlock; positions and pos: see _MaskTokenDecoder."""
        blocks = nn.ModuleList(TargetAwareBlock(dim, heads, context_dim, order) for _ in range(depth))
        super().__init__(grid, in_dim, dim, out_dim, blocks, positions, pos)

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
