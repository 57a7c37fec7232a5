"""Unit tests of BootMAE's target-aware decoder and the shared targets/losses (per-channel pixel norm,
centre weighting, weighted means, loss-weight ramps, cosine losses). Official formulas are from LightDXY/BootMAE
at commit f9512008 (modeling = models/modeling_pretrain_bootmae.py, run = run_pretraining.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import losses
from pipeline.models.decoder import TargetAwareBlock, TargetAwareDecoder
from pipeline.models.encoder import build_encoder
from pipeline.models.masking import random_masking

MODEL = dict(arch="vit_tiny_patch16_224", patch_size=2, embed_dim=32, depth=2, num_heads=2)


def student_inputs(x, seed=0):
    """Encoder output and both block outputs on the visible tokens only, plus the mask."""
    enc = build_encoder(MODEL, 8, 1, seed=0).eval()
    mask = random_masking(x.shape[0], enc.num_patches, 0.75, torch.Generator().manual_seed(seed))
    latent, blocks = enc(x, mask.ids_keep, return_blocks=(0, 1))
    return latent, [blocks[0], blocks[1]], mask


def decoder(depth=2, **kw):
    torch.manual_seed(0)
    return TargetAwareDecoder(grid=4, in_dim=32, dim=16, depth=depth, heads=2, out_dim=4, context_dim=32, **kw)


def test_target_aware_decoder_shape_and_context_dependence():
    x = torch.randn(2, 1, 8, 8)
    latent, context, mask = student_inputs(x)
    assert latent.shape == (2, 1 + 4, 32) and all(c.shape == (2, 1 + 4, 32) for c in context)
    dec = decoder()
    out = dec(latent, mask.ids_restore, context)
    assert out.shape == (2, 1 + 16, 4)
    changed = dec(latent, mask.ids_restore, [context[0], context[1] + torch.randn_like(context[1])])
    assert not torch.allclose(out, changed)


def test_target_aware_decoder_rejects_context_beyond_the_visible_tokens():
    x = torch.randn(2, 1, 8, 8)
    latent, context, mask = student_inputs(x)
    full = build_encoder(MODEL, 8, 1, seed=0).eval()(x, return_blocks=(0,))[1][0]   # (2, 17, 32)
    with pytest.raises(ValueError, match="visible"):
        decoder()(latent, mask.ids_restore, [full])
    with pytest.raises(ValueError, match="expected 1 or 2"):
        decoder()(latent, mask.ids_restore, context + context[:1])


def test_target_aware_decoder_cannot_see_masked_pixels():
    x = torch.randn(2, 1, 8, 8)
    latent, context, mask = student_inputs(x)
    patches = losses.patchify(x, 2)
    hidden = losses.unpatchify(patches + 5 * torch.randn_like(patches) * mask.mask[..., None], 2, 1)
    visible = losses.unpatchify(patches + 5 * torch.randn_like(patches) * (1 - mask.mask[..., None]), 2, 1)
    dec = decoder().eval()
    out = dec(latent, mask.ids_restore, context)
    latent_h, context_h, _ = student_inputs(hidden)
    assert not torch.equal(hidden, x)
    assert torch.equal(dec(latent_h, mask.ids_restore, context_h), out)
    latent_v, context_v, _ = student_inputs(visible)
    assert not torch.allclose(dec(latent_v, mask.ids_restore, context_v), out)


@pytest.mark.parametrize("order", ["self_cross_mlp", "cross_self_mlp"])
def test_target_aware_decoder_backward_reaches_cross_attention(order):
    latent, context, mask = student_inputs(torch.randn(2, 1, 8, 8))
    dec = decoder(order=order)
    dec(latent, mask.ids_restore, context).pow(2).mean().backward()
    for block in dec.blocks:
        grads = {n: p.grad for n, p in block.cross.named_parameters()}
        assert set(grads) >= {"context_norm.weight", "q.weight", "kv.weight", "proj.weight"}
        assert ("context.weight" in grads) == (order == "cross_self_mlp")
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_mask_tokens_alone_get_positions_by_default():
    """modeling:L481-484 (pixel decoder, its own sin-cos) and L492-495 (feature decoder, the encoder's
    pos_embed): positions are gathered for the masked slots and added to the mask tokens only; visible
    tokens and cls enter as the projected encoder output. positions "all" adds them to every token (MAE)."""
    latent, _, mask = student_inputs(torch.randn(2, 1, 8, 8))
    custom = torch.randn(17, 16)
    for pos in (None, custom):
        dec = decoder(pos=pos)
        table = dec.pos[0]
        assert torch.equal(table, custom) if pos is not None else table.shape == (17, 16)
        tokens = dec.tokens(latent, mask.ids_restore)
        embedded = dec.embed(latent)
        assert tokens.shape == (2, 17, 16) and torch.equal(tokens[:, 0], embedded[:, 0])
        for b in range(2):
            visible = mask.ids_keep[b].tolist()
            for j, patch in enumerate(visible):
                assert torch.equal(tokens[b, 1 + patch], embedded[b, 1 + j])
            for patch in set(range(16)) - set(visible):
                assert torch.allclose(tokens[b, 1 + patch], dec.mask_token[0, 0] + table[1 + patch])
        everywhere = decoder(positions="all", pos=pos)        # the same weights (seed), positions on every token
        hidden = torch.cat([torch.zeros(2, 1), mask.mask], 1)[..., None]        # cls slot first
        assert torch.allclose(everywhere.tokens(latent, mask.ids_restore) - table, tokens - hidden * table, atol=1e-6)
    with pytest.raises(ValueError, match="'all' or 'masked'"):
        decoder(positions="visible")


def test_target_aware_block_is_self_attention_then_cross_attention_then_mlp():
    """modeling:L153-157 (Decode_Block.forward): x += attn(norm1(x)); x += c_attn(norm3(x), norm4(fea));
    x += mlp(norm2(x)), where norm4 is a LayerNorm at the context's width (L140) and the keys/values come
    from Linear(context width) (L85). The old order (cross first, context through Linear then LayerNorm)
    is order "cross_self_mlp"."""
    torch.manual_seed(0)
    block = TargetAwareBlock(16, 2, 32).eval()
    cross = block.cross
    assert isinstance(cross.context, torch.nn.Identity) and cross.context_norm.normalized_shape == (32,)
    assert cross.kv.in_features == 32 and cross.kv.out_features == 32 and cross.q.in_features == 16
    x, ctx = torch.randn(2, 9, 16), torch.randn(2, 5, 32)
    b = block.block

    def attend(q, k, v):                        # (B, N, 16) -> two heads of 8
        split = lambda t: t.reshape(t.shape[0], t.shape[1], 2, 8).transpose(1, 2)
        out = F.softmax(split(q) @ split(k).transpose(-2, -1) / 8 ** 0.5, dim=-1) @ split(v)
        return out.transpose(1, 2).reshape(q.shape)

    h = x + b.attn.proj(attend(*b.attn.qkv(b.norm1(x)).chunk(3, dim=-1)))
    k, v = cross.kv(F.layer_norm(ctx, (32,), cross.context_norm.weight, cross.context_norm.bias)).chunk(2, dim=-1)
    h = h + cross.proj(attend(cross.q(cross.norm(h)), k, v))
    h = h + b.mlp(b.norm2(h))
    assert torch.allclose(block(x, ctx), h, atol=1e-5)
    torch.manual_seed(0)
    old = TargetAwareBlock(16, 2, 32, order="cross_self_mlp").eval()
    assert old.cross.context.in_features == 32 and old.cross.context_norm.normalized_shape == (16,)
    assert torch.allclose(old(x, ctx), old.block(old.cross(x, ctx)))
    with pytest.raises(ValueError, match="self_cross_mlp, cross_self_mlp"):
        TargetAwareBlock(16, 2, 32, order="mlp_first")


def test_target_aware_decoder_single_context_is_shared_by_every_block():
    latent, context, mask = student_inputs(torch.randn(2, 1, 8, 8))
    dec = decoder(depth=3)
    assert torch.equal(dec(latent, mask.ids_restore, context[1:]),
                       dec(latent, mask.ids_restore, [context[1]] * 3))


def test_per_channel_patch_norm():
    scale, shift = torch.tensor([1.0, 5.0, 0.2]), torch.tensor([0.0, 3.0, -1.0])
    x = torch.randn(2, 3, 8, 8) * scale[:, None, None] + shift[:, None, None]
    p = losses.patchify(x, 2)
    n = losses.normalize_patches_per_channel(p, 3)
    assert n.shape == p.shape
    per_channel = n.reshape(2, 16, 4, 3)                          # (B, L, p*p, C): channel last
    assert torch.allclose(per_channel.mean(2), torch.zeros(2, 16, 3), atol=1e-5)
    assert torch.allclose(per_channel.std(2), torch.ones(2, 16, 3), atol=1e-3)
    # channel c of patch 0 is the 2x2 block of image channel c
    block = x[0, 1, :2, :2].flatten()
    assert torch.allclose(per_channel[0, 0, :, 1], (block - block.mean()) / (block.var() + 1e-6) ** 0.5)
    g = torch.randn(2, 16, 4)
    assert torch.equal(losses.normalize_patches_per_channel(g, 1), losses.normalize_patches(g))
    # eps reaches the per-channel standardisation (a large eps shrinks every patch by the same known factor)
    big = losses.normalize_patches_per_channel(p, 3, eps=100.0).reshape(2, 16, 4, 3)
    centred = p.reshape(2, 16, 4, 3) - p.reshape(2, 16, 4, 3).mean(2, keepdim=True)
    assert torch.allclose(big, centred / (centred.var(2, keepdim=True) + 100.0) ** 0.5, atol=1e-6)


def test_center_weights_hand_computed():
    """BootMAE: 1 + (masked cells of the 3x3 neighbourhood, zero-padded) / 9 on masked tokens, 0 elsewhere."""
    mask = torch.tensor([[1.0, 1, 1, 0],
                         [1, 1, 1, 0],
                         [1, 1, 1, 0],
                         [0, 0, 0, 1]])
    masked_neighbours = torch.tensor([[4.0, 6, 4, 0],
                                      [6, 9, 6, 0],
                                      [4, 6, 5, 0],
                                      [0, 0, 0, 2]])
    expected = mask * (1 + masked_neighbours / 9)
    masks = torch.stack([mask.flatten(), 1 - mask.flatten()])      # and its complement
    w = losses.center_weights(masks, grid=4)
    assert w.shape == (2, 16)
    assert torch.allclose(w[0], expected.flatten())
    assert w[0, 5].item() == pytest.approx(2.0)                    # (1, 1): the centre of a 3x3 masked block
    assert (w[masks == 0] == 0).all()
    assert w[1, 3].item() == pytest.approx(1 + 2 / 9)              # corner (0, 3): itself and (1, 3) masked


def test_center_weights_zero_on_visible_tokens():
    m = random_masking(3, 16, 0.75, torch.Generator().manual_seed(0)).mask
    w = losses.center_weights(m, 4)
    assert (w[m == 0] == 0).all() and (w[m == 1] >= 1 + 1 / 9 - 1e-6).all() and (w <= 2 + 1e-6).all()


def test_weighted_mean_of_a_mask_is_the_masked_mean_and_losses_unchanged():
    per = torch.randn(3, 16)
    m = random_masking(3, 16, 0.75, torch.Generator().manual_seed(0)).mask
    assert torch.equal(losses.weighted_mean(per, m), losses.masked_mean(per, m))
    assert losses.masked_mean(per, m).item() == pytest.approx(per[m == 1].mean().item(), abs=1e-6)
    assert losses.masked_mean(per, torch.zeros_like(m)).item() == 0
    w = torch.rand(3, 16)
    assert losses.weighted_mean(per, w).item() == pytest.approx(((per * w).sum() / w.sum()).item(), abs=1e-6)
    pred, target = torch.randn(3, 16, 5), torch.randn(3, 16, 5)
    d = pred - target
    assert losses.mse(pred, target, m).item() == pytest.approx((d[m == 1] ** 2).mean().item(), abs=1e-6)
    huber = torch.where(d.abs() < 2, 0.5 * d ** 2 / 2, d.abs() - 1)
    assert losses.smooth_l1(pred, target, m, beta=2.0).item() == pytest.approx(huber[m == 1].mean().item(),
                                                                              abs=1e-6)


def test_weighted_mean_divides_by_small_weight_sums_and_gives_zero_without_weights():
    """Real-valued weights may sum to less than 1: they are divided by, not clamped; all-zero weights give 0."""
    assert losses.weighted_mean(torch.full((1, 2), 3.0), torch.tensor([[0.25, 0.25]])).item() == 3.0
    assert losses.weighted_mean(torch.full((1, 2), 3.0), torch.zeros(1, 2)).item() == 0.0


def test_masked_count_denominator_is_bootmaes_official_pixel_loss():
    """run:L450 (pixels) and L459 (features): mean(weight * err) / mean(loss_mask), with the per-token weights
    and the 0/1 mask upsampled to pixels (nearest) = sum of weighted per-token errors / number of masked
    tokens, not / the sum of the weights."""
    torch.manual_seed(0)
    grid, p, channels = 4, 2, 3
    mask = random_masking(3, 16, 0.75, torch.Generator().manual_seed(0)).mask
    weights = losses.center_weights(mask, grid)
    pred, target = torch.randn(3, channels, 8, 8), torch.randn(3, channels, 8, 8)
    up = lambda t: F.interpolate(t.reshape(-1, 1, grid, grid), (8, 8), mode="nearest")
    official = torch.mean(up(weights) * (pred - target) ** 2) / torch.mean(up(mask))
    ours = losses.mse(losses.patchify(pred, p), losses.patchify(target, p), weights, count=mask)
    assert ours.item() == pytest.approx(official.item(), rel=1e-5)
    by_weights = losses.mse(losses.patchify(pred, p), losses.patchify(target, p), weights)
    assert by_weights.item() == pytest.approx(official.item() * mask.sum().item() / weights.sum().item(), rel=1e-5)
    feat_pred, feat_target = torch.randn(3, 16, 6), torch.randn(3, 16, 6)   # L459: perc_mask (B, L, 1)
    official = torch.mean(weights[..., None] * (feat_target - feat_pred) ** 2) / torch.mean(up(mask))
    assert losses.mse(feat_pred, feat_target, weights, count=mask).item() == pytest.approx(official.item(), rel=1e-5)


@pytest.mark.parametrize("epochs", [801, 12, 3])
def test_epoch_ramp_is_bootmaes_official_feature_weight(epochs):
    """run:L386-387: feature_weight = w (1 + epoch) / E, then min(4 feature_weight, w)."""
    for w in (1.0, 0.5):
        for epoch in range(epochs):
            official = min(w * (1 + epoch) / epochs * 4, w)
            assert losses.epoch_ramp(epoch, epochs, 0.25, end=w) == pytest.approx(official, rel=1e-12)
    assert losses.epoch_ramp(0, 10, 0.0, end=0.7) == 0.7
    assert losses.epoch_ramp(0, 8, 0.25) == 0.5 and losses.epoch_ramp(7, 8, 0.25) == 1.0     # end defaults to 1


def test_ramp_endpoints_and_midpoint():
    assert losses.ramp(0, 100, 0.25) == 0.0
    assert losses.ramp(10, 80, 0.25) == pytest.approx(0.5)
    assert losses.ramp(25, 100, 0.25) == 1.0 and losses.ramp(99, 100, 0.25) == 1.0
    assert losses.ramp(5, 40, 0.25, start=0.2, end=0.6) == pytest.approx(0.4)
    assert losses.ramp(0, 100, 0.0) == 1.0 and losses.ramp(0, 100, 0.0, end=0.3) == 0.3
    assert losses.ramp(0, 2, 0.5) == 0.0 and losses.ramp(1, 2, 0.5) == 1.0     # a ramp of a single step still ramps


def test_cosine_loss_channels_axis():
    a = torch.randn(2, 4, 8)
    ones = torch.ones(2, 4)
    assert losses.cosine_loss(a, a, ones).item() == pytest.approx(0, abs=1e-6)
    assert losses.cosine_loss(a, -3 * a, ones).item() == pytest.approx(2, abs=1e-6)
    e0, e1 = torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)
    e0[..., 0], e1[..., 1] = 1, 1
    assert losses.cosine_loss(e0, e1, torch.ones(1, 1)).item() == pytest.approx(1)
    # weighted over tokens: token 0 identical (loss 0), token 1 opposite (loss 2), weights 3 and 1
    pred = torch.tensor([[[1.0, 2.0], [1.0, 0.0]]])
    target = torch.tensor([[[2.0, 4.0], [-1.0, 0.0]]])
    assert losses.cosine_loss(pred, target, torch.tensor([[3.0, 1.0]])).item() == pytest.approx(0.5)


def test_cosine_loss_tokens_axis_sdae_quirk():
    pred = torch.tensor([[[1.0, 0.0], [5.0, 5.0], [0.0, 1.0]]])     # token 1 is visible: ignored
    target = torch.tensor([[[1.0, 1.0], [-3.0, 2.0], [1.0, 0.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    # channel 0 over masked tokens: (1, 0) vs (1, 1) -> cos 1/sqrt(2); channel 1: (0, 1) vs (1, 0) -> cos 0
    expected = ((1 - 1 / math.sqrt(2)) + (1 - 0)) / 2
    assert losses.cosine_loss(pred, target, mask, axis="tokens").item() == pytest.approx(expected)
    assert losses.cosine_loss(pred, target, 0.5 * mask, axis="tokens").item() == pytest.approx(expected)
    # SdAE's own form on the selected masked tokens (B, N_masked, D)
    m = random_masking(3, 16, 0.75, torch.Generator().manual_seed(0))
    p, t = torch.randn(3, 16, 6), torch.randn(3, 16, 6)
    idx = torch.argsort(m.ids_restore, 1)[:, 4:]                    # masked tokens, shuffled order
    p_m, t_m = (torch.gather(z, 1, idx[..., None].expand(-1, -1, 6)) for z in (p, t))
    sdae = (1 - torch.nn.functional.cosine_similarity(p_m, t_m, dim=1)).mean()
    assert losses.cosine_loss(p, t, m.mask, axis="tokens").item() == pytest.approx(sdae.item(), abs=1e-6)


def test_cosine_loss_unknown_axis():
    with pytest.raises(ValueError, match="axis"):
        losses.cosine_loss(torch.ones(1, 2, 3), torch.ones(1, 2, 3), torch.ones(1, 2), axis="batch")


def test_standardize_tokens_is_layer_norm_without_affine():
    x = torch.randn(2, 5, 8) * 3 + 1
    ln = torch.nn.LayerNorm(8, eps=1e-6, elementwise_affine=False)
    assert torch.allclose(losses.standardize_tokens(x), ln(x), atol=1e-6)
