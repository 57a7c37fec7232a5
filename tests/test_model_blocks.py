"""Unit tests of the model building blocks' contracts, beyond test_model_parts.py and test_targets_decoder.py:

- the decoders' blocks are timm Blocks with mlp_ratio 4, qkv bias and torch's LayerNorm (not timm's own
  LayerNorm, Block's default), no stochastic depth unless asked (Decoder and build_decoder, which passes its
  drop_path on), and the fixed positions are a buffer kept out of the state dict;
- CrossAttention: BootMAE's context path by default, softmax(q k^T / sqrt(d)) v over the right axes against a
  hand computation (queries and context of different lengths), an error naming the width and heads;
- TargetAwareDecoder's context error names the latent's and the context's token counts;
- DropPath: the identity (no draw) in eval mode or at rate 0; otherwise each sample kept with its own draw and
  scaled by 1 / keep, the scale on the input's device (meta stands in for an accelerator) and in its dtype;
- Encoder.features defaults to the cls token; Encoder.truncated keeps all blocks when asked for all of them.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.decoder import CrossAttention, Decoder, TargetAwareBlock, TargetAwareDecoder, build_decoder
from pipeline.models.encoder import DropPath, build_encoder, step_draws
from pipeline.settings import Model

ENCODER = dict(arch="vit_tiny_patch16_224", patch_size=2, embed_dim=32, depth=3, num_heads=2)
MODEL = Model(**ENCODER, decoder_dim=16, decoder_depth=3, decoder_heads=2)


def drop_rates(blocks):
    return [sorted({round(m.drop_prob, 6) for m in b.modules() if isinstance(m, DropPath)}) for b in blocks]


def assert_timm_block(block, dim):
    """timm's Block as MAE's/BootMAE's decoders build it: qkv with bias, MLP hidden 4 * dim, torch LayerNorms."""
    assert block.attn.qkv.bias is not None and block.attn.qkv.bias.shape == (3 * dim,)
    assert block.mlp.fc1.weight.shape == (4 * dim, dim) and block.mlp.fc2.weight.shape == (dim, 4 * dim)
    assert type(block.norm1) is nn.LayerNorm and type(block.norm2) is nn.LayerNorm


def test_decoder_blocks_are_timm_blocks_without_drop_path_by_default():
    torch.manual_seed(0)
    dec = Decoder(grid=4, in_dim=32, dim=16, depth=3, heads=2, out_dim=4)
    for block in dec.blocks:
        assert_timm_block(block, 16)
    assert drop_rates(dec.blocks) == [[], [], []]
    # the fixed positions: a buffer, not a weight to save (they are rebuilt from the sizes)
    assert "pos" in dict(dec.named_buffers()) and "pos" not in dec.state_dict()
    latent, ids_restore = torch.randn(2, 5, 32), torch.stack([torch.randperm(16) for _ in range(2)])
    with step_draws(torch.Generator().manual_seed(0)):
        trained = dec.train()(latent, ids_restore)
    assert torch.equal(trained, dec.eval()(latent, ids_restore))       # no stochastic depth in training either


def test_build_decoder_passes_its_drop_path_on_and_defaults_to_none():
    encoder = build_encoder(ENCODER, 8, 1, seed=0)
    plain = build_decoder(encoder, MODEL, 4, seed=1)
    dropped = build_decoder(encoder, MODEL, 4, seed=1, drop_path=0.2)
    assert drop_rates(plain.blocks) == [[], [], []] and drop_rates(dropped.blocks) == [[], [0.1], [0.2]]
    assert len(plain.blocks) == 3 and plain.head.out_features == 4 and plain.embed.in_features == 32
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), dropped.state_dict().values()))


def test_target_aware_block_is_a_timm_block_and_its_decoder_keeps_positions_out_of_the_state_dict():
    torch.manual_seed(0)
    for order in ("self_cross_mlp", "cross_self_mlp"):
        assert_timm_block(TargetAwareBlock(16, 2, 32, order).block, 16)
    dec = TargetAwareDecoder(grid=4, in_dim=32, dim=16, depth=2, heads=2, out_dim=4, context_dim=32)
    for block in dec.blocks:
        assert_timm_block(block.block, 16)
    assert "pos" in dict(dec.named_buffers()) and "pos" not in dec.state_dict()


def test_target_aware_decoder_context_error_names_the_token_counts():
    dec = TargetAwareDecoder(grid=4, in_dim=32, dim=16, depth=2, heads=2, out_dim=4, context_dim=32)
    latent, ids_restore = torch.randn(2, 5, 32), torch.stack([torch.randperm(16) for _ in range(2)])
    with pytest.raises(ValueError, match=r"^context must hold the 5 visible \(\+cls\) tokens of the latent, "
                                         r"got \[5, 17\]$"):
        dec(latent, ids_restore, [torch.randn(2, 5, 32), torch.randn(2, 17, 32)])


@pytest.mark.parametrize("fused", [True, False])
def test_cross_attention_is_softmax_qk_over_sqrt_d_times_v_with_bootmaes_context_by_default(fused):
    torch.manual_seed(0)
    cross = CrossAttention(12, 3, 20)                     # BootMAE's: LayerNorm at the context's width, no projection
    assert isinstance(cross.context, nn.Identity) and cross.context_norm.normalized_shape == (20,)
    assert cross.kv.in_features == 20
    cross.fused_attn = fused
    x, ctx = torch.randn(2, 7, 12), torch.randn(2, 5, 20)   # 7 queries, 5 context tokens, 3 heads of 4
    q = cross.q(cross.norm(x))
    k, v = cross.kv(cross.context_norm(ctx)).chunk(2, dim=-1)
    out = torch.zeros(2, 7, 12)
    for b in range(2):
        for h in range(3):
            cols = slice(4 * h, 4 * h + 4)
            weights = torch.softmax(q[b, :, cols] @ k[b, :, cols].T / 2.0, dim=1)        # (7, 5), sqrt(4) = 2
            out[b, :, cols] = weights @ v[b, :, cols]
    assert torch.allclose(cross(x, ctx), x + cross.proj(out), atol=1e-5)
    with pytest.raises(ValueError, match=r"^decoder width 10 is not divisible by 3 heads$"):
        CrossAttention(10, 3, 20)


def test_drop_path_is_the_identity_without_drawing_in_eval_or_at_rate_zero():
    x = torch.randn(4, 3, 2)
    for drop in (DropPath(0.0).train(), DropPath(0.5).eval()):
        g = torch.Generator().manual_seed(0)
        state = g.get_state()
        with step_draws(g):
            assert drop(x) is x
        assert torch.equal(g.get_state(), state)          # no draw: later draws of the step are unchanged


def test_drop_path_keeps_each_sample_with_its_own_draw_scaled_by_one_over_keep():
    x = torch.randn(6, 3, 2)
    with step_draws(torch.Generator().manual_seed(1)):
        out = DropPath(0.4).train()(x)
    keep = torch.rand(6, generator=torch.Generator().manual_seed(1)) < 0.6
    assert 0 < keep.sum() < 6                             # this seed keeps some samples and drops others
    scale = keep.float() / 0.6
    assert torch.allclose(out, x * scale[:, None, None])


def test_drop_path_scale_follows_the_inputs_dtype_and_device():
    with step_draws(torch.Generator().manual_seed(1)):
        out = DropPath(0.4).train()(torch.ones(6, 3, dtype=torch.bfloat16))
    keep = torch.rand(6, generator=torch.Generator().manual_seed(1)) < 0.6
    assert out.dtype == torch.bfloat16                    # a bf16 step stays bf16
    assert torch.equal(out, (keep.float() / 0.6).to(torch.bfloat16)[:, None].expand(6, 3))
    with step_draws(torch.Generator().manual_seed(1)):    # meta stands in for an accelerator
        out = DropPath(0.4).train()(torch.ones(6, 3, device="meta"))
    assert out.device.type == "meta" and out.shape == (6, 3) and out.dtype == torch.float32


def test_encoder_features_default_to_the_cls_token():
    enc = build_encoder(ENCODER, 8, 1, seed=0).eval()
    x = torch.randn(2, 1, 8, 8)
    h = enc(x)
    assert torch.allclose(enc.features(x), h[:, 0]) and torch.allclose(enc.features(x, "cls"), h[:, 0])
    assert torch.allclose(enc.features(x, "mean"), h[:, 1:].mean(dim=1))
    assert not torch.allclose(h[:, 0], h[:, 1]) and not torch.allclose(h[:, 0], h[:, 1:].mean(dim=1))


def test_encoder_truncated_to_all_its_blocks_is_the_whole_encoder():
    enc = build_encoder(ENCODER, 8, 1, seed=0).eval()
    same = enc.truncated(3)
    x = torch.randn(2, 1, 8, 8)
    assert len(same.vit.blocks) == 3 and same.config == enc.config
    assert torch.equal(same(x), enc(x))
    with pytest.raises(ValueError, match="cannot keep -1 of 3 blocks"):
        enc.truncated(-1)


def test_decoder_layer_norms_use_maes_eps():
    """MAE's decoder norms are LayerNorm(eps=1e-6) (models_mae.py: partial(nn.LayerNorm, eps=1e-6))."""
    dec = Decoder(grid=4, in_dim=32, dim=16, depth=2, heads=2, out_dim=4)
    norms = [m for m in dec.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 5 and all(type(m) is nn.LayerNorm and m.eps == 1e-6 for m in norms)
    x = torch.randn(3, 16) * 1e-3                          # eps matters at small variance
    assert torch.allclose(dec.norm(x), F.layer_norm(x, (16,), eps=1e-6), atol=1e-5)


def test_decoder_mask_token_is_normal_with_std_0_02():
    """MAE's init: torch.nn.init.normal_(mask_token, std=.02)."""
    torch.manual_seed(0)
    dec = Decoder(grid=4, in_dim=32, dim=512, depth=1, heads=2, out_dim=4)
    assert abs(dec.mask_token.std().item() - 0.02) < 0.003
