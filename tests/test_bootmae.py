"""BootMAE's training step and build (pipeline/methods/bootmae.py) on the tiny preset, against an independent
recomputation from the model's own parts.

What is checked (official formulas: LightDXY/BootMAE at commit f9512008, run_pretraining.py:L386-387, L450, L459):
- the loss is pixel loss + w_f(step) * feature loss, with w_f ramped per epoch e of the E whole epochs up to the
  configured feature_weight (not 1), and forward's default step is step 0;
- the mask is hybrid_masking's from the given generator with the configured block options (max_block as a share
  of the patches, block_attempts), so the same generator gives the same loss whatever the global RNG;
- the student encoder sees the visible patches only; the pixel decoder cross-attends to block 0's output, the
  feature decoder to the last block's, and the feature target is the EMA teacher's last block;
- both losses sum centre-weighted errors (plain 0/1 mask weights when center_weight is off) and divide by the
  number of masked tokens;
- the pixel head predicts patch_size**2 * in_chans values; bootmae.decoder_depth overrides model.decoder_depth;
  evaluate_weights picks the evaluated encoder; the decoders are initialised from seed + 1, apart from the
  encoder's seed and reproducibly;
- forward_flops counts the context projection of block_order cross_self_mlp (at widths where it differs).
"""
import pytest
import torch

from pipeline import config
from pipeline.methods import METHODS, bootmae
from pipeline.models import losses
from pipeline.models.decoder import TargetAwareDecoder
from pipeline.models.masking import hybrid_masking, max_block_patches


@pytest.fixture(scope="module")
def params():
    return config.load("tiny", check_paths=False)


def build(params, own=None, model=None, in_chans=1, seed=0):
    p = config.merge(params, {"bootmae": own or {}, "model": model or {}})
    return METHODS["bootmae"](p, in_chans, seed), p


def expected_mask(p, batch, seed):
    """hybrid_masking with the section's options, from a generator seeded `seed`."""
    own, m = p["bootmae"], p["model"]
    num = (p["data"]["img_size"] // m["patch_size"]) ** 2
    return hybrid_masking(batch, num, p["pretrain"]["mask_ratio"], torch.Generator().manual_seed(seed),
                          own["block_ratio"], own["min_block"], max_block_patches(own["max_block"], num),
                          own["block_attempts"])


def recompute(model, p, x, seed):
    """pred, features, pixel loss and feature loss of a step, from the model's parts and the expected mask."""
    own, enc = p["bootmae"], model.encoder
    mask = expected_mask(p, x.shape[0], seed)
    last = p["model"]["depth"] - 1
    latent, blocks = enc(x, mask.ids_keep, return_blocks=(0, last))
    pred = model.pixel_decoder(latent, mask.ids_restore, [blocks[0]])[:, 1:]
    features = model.feature_decoder(latent, mask.ids_restore, [blocks[last]])[:, 1:]
    target = model.teacher_encoder(x, return_blocks=(last,))[1][last][:, 1:]
    pixels = losses.normalize_patches_per_channel(losses.patchify(x, p["model"]["patch_size"]), x.shape[1])
    weights = losses.center_weights(mask.mask, enc.grid) if own["center_weight"] else mask.mask
    count = mask.mask.sum()
    pixel_loss = (weights * ((pred - pixels) ** 2).mean(-1)).sum() / count
    feature_err = ((losses.standardize_tokens(features) - losses.standardize_tokens(target)) ** 2).mean(-1)
    return mask, pred, features, pixel_loss, (weights * feature_err).sum() / count


@pytest.mark.parametrize("own", [{}, {"center_weight": False}, {"block_attempts": 1}, {"max_block": None}])
def test_step_matches_its_recomputation_from_the_mask_and_the_blocks(params, own):
    """Mask from the generator with the configured block options; pixel decoder on block 0's context, feature
    decoder on the last block's, target = the teacher's last block; losses / number of masked tokens."""
    model, p = build(params, own)
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        _, out = model(x, torch.Generator().manual_seed(5))
        mask, pred, features, pixel_loss, feature_loss = recompute(model, p, x, 5)
    assert torch.equal(out["mask"], mask.mask)
    assert torch.allclose(out["pred"], pred, atol=1e-6) and torch.allclose(out["features"], features, atol=1e-6)
    assert out["pixel_loss"].item() == pytest.approx(pixel_loss.item(), rel=1e-5)
    assert out["feature_loss"].item() == pytest.approx(feature_loss.item(), rel=1e-5)


def test_block_options_change_the_mask(params):
    """The configured max_block and block_attempts reach the masking (else the recomputation above proves little)."""
    masks = [expected_mask(config.merge(params, {"bootmae": own}), 8, 5).mask
             for own in ({}, {"block_attempts": 1}, {"max_block": None})]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_loss_is_pixel_loss_plus_the_ramped_feature_weight_times_feature_loss(params):
    """w_f = min(w (e + 1) / (ramp_fraction E), w) with w = feature_weight 2 (not 1), E = the whole epochs;
    forward's default step is 0."""
    model, _ = build(params, {"feature_weight": 2.0})
    model.start_schedule(steps_per_epoch=1, total_steps=8)      # E = 8, ramp over 2 epochs: w_f 1, 2, 2, ...
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        for step, weight in ((0, 1.0), (1, 2.0), (7, 2.0)):
            loss, out = model(x, torch.Generator().manual_seed(0), step)
            assert model.feature_weight(step) == pytest.approx(weight)
            assert out["feature_loss"] > 0.1
            assert loss.item() == pytest.approx((out["pixel_loss"] + weight * out["feature_loss"]).item(), rel=1e-6)
        default, _ = model(x, torch.Generator().manual_seed(0))
        first, _ = model(x, torch.Generator().manual_seed(0), 0)
    assert default.item() == first.item()
    model.start_schedule(steps_per_epoch=10, total_steps=85)    # E = 8 whole epochs (not 8.5)
    assert [model.feature_weight(s) for s in (0, 9, 10, 84)] == pytest.approx([1.0, 1.0, 2.0, 2.0])
    unramped, _ = build(params, {"feature_weight": 2.0})
    assert unramped.feature_weight(0) == 2.0                    # no schedule started: w_f as configured


def test_same_generator_same_loss_whatever_the_global_rng(params):
    model, _ = build(params)
    x = torch.randn(4, 1, 8, 8)
    losses_ = []
    with torch.no_grad():
        for global_seed in (1, 2):
            torch.manual_seed(global_seed)
            losses_.append(model(x, torch.Generator().manual_seed(3))[0])
        other = model(x, torch.Generator().manual_seed(4))[0]
    assert torch.equal(losses_[0], losses_[1]) and not torch.equal(losses_[0], other)


def test_student_sees_only_the_visible_patches(params):
    """Changing the hidden patches changes the targets but neither decoder's prediction."""
    model, p = build(params)
    x = torch.randn(4, 1, 8, 8)
    mask = expected_mask(p, 4, 0).mask
    patch = p["model"]["patch_size"]
    hidden = mask.reshape(4, 1, 4, 4).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    y = x + 3 * hidden * torch.randn_like(x)
    with torch.no_grad():
        _, a = model(x, torch.Generator().manual_seed(0))
        _, b = model(y, torch.Generator().manual_seed(0))
    assert torch.equal(a["mask"], mask) and torch.equal(b["mask"], mask)
    assert torch.allclose(a["pred"], b["pred"], atol=1e-6) and torch.allclose(a["features"], b["features"], atol=1e-6)
    assert not torch.allclose(a["pixel_loss"], b["pixel_loss"])


def test_pixel_head_predicts_every_channel_of_a_patch(params):
    """patch_size**2 * in_chans values per patch (patch 4, 3 channels: 48), per-channel normalised target."""
    model, p = build(params, model={"patch_size": 4}, in_chans=3)
    assert model.pixel_decoder.head.out_features == 4 ** 2 * 3
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        _, out = model(x, torch.Generator().manual_seed(0))
        _, pred, _, pixel_loss, _ = recompute(model, p, x, 0)
    assert out["pred"].shape == (2, 4, 48) and torch.allclose(out["pred"], pred, atol=1e-6)
    assert out["pixel_loss"].item() == pytest.approx(pixel_loss.item(), rel=1e-5)


def test_decoder_depth_comes_from_the_section_when_set(params):
    from pipeline.settings import Geometry

    model, p = build(params, {"decoder_depth": 3})
    assert len(model.pixel_decoder.blocks) == len(model.feature_decoder.blocks) == 3
    assert bootmae.decoder_depth(p["bootmae"], Geometry.of(p)) == 3
    plain, p1 = build(params)
    assert len(plain.pixel_decoder.blocks) == len(plain.feature_decoder.blocks) == params["model"]["decoder_depth"]
    assert bootmae.forward_flops(p)[0] > bootmae.forward_flops(p1)[0]


@pytest.mark.parametrize("weights", ["student", "teacher"])
def test_evaluate_weights_picks_the_evaluated_encoder(params, weights):
    model, _ = build(params, {"evaluate_weights": weights})
    assert model.evaluated_encoder() is (model.teacher_encoder if weights == "teacher" else model.encoder)


def test_decoders_are_initialised_from_seed_plus_one(params):
    """Reproducible, apart from the encoder's draws: the two decoders, in this order, from a generator seeded
    seed + 1 (the convention of pipeline.models.decoder.build_decoder)."""
    model, p = build(params, seed=7)
    m, own = p["model"], p["bootmae"]
    shared = dict(context_dim=m["embed_dim"], order=own["block_order"], positions=own["decoder_positions"])
    grid = p["data"]["img_size"] // m["patch_size"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(8)
        pixel = TargetAwareDecoder(grid, m["embed_dim"], m["decoder_dim"], m["decoder_depth"], m["decoder_heads"],
                                   m["patch_size"] ** 2, **shared)
        feature = TargetAwareDecoder(grid, m["embed_dim"], m["embed_dim"], m["decoder_depth"], m["num_heads"],
                                     m["embed_dim"], pos=model.encoder.vit.pos_embed[0], **shared)
    for built, expected in ((model.pixel_decoder, pixel), (model.feature_decoder, feature)):
        got = built.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    again, _ = build(params, seed=7)
    assert torch.equal(again.pixel_decoder.head.weight, model.pixel_decoder.head.weight)


def test_flops_count_the_context_projection_of_cross_self_mlp(params):
    """At decoder_dim 24 (embed_dim 32 is not twice it, so the projection's count differs from none) the analytic
    count of both decoders equals torch's FLOP counter on their blocks."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.hardware import attention_kernels
    from pipeline.models.encoder import encoder_flops
    from pipeline.models.flops import token_counts
    from pipeline.settings import Geometry

    model, p = build(params, {"block_order": "cross_self_mlp", "feature_decoder": "decoder"}, {"decoder_dim": 24})
    m = p["model"]
    num, visible, _ = token_counts(Geometry.of(p))
    counted = 0
    for dec in (model.pixel_decoder, model.feature_decoder):
        tokens, context = torch.randn(1, 1 + num, dec.embed.out_features), torch.randn(1, 1 + visible, m["embed_dim"])
        with attention_kernels(dec, "cpu", reduced=True), FlopCounterMode(display=False) as counter:
            for block in dec.blocks:
                block(tokens, context)
        counted += counter.get_total_flops()
    student, _ = bootmae.forward_flops(p)
    assert student - encoder_flops(m["embed_dim"], m["depth"], 1 + visible) == counted


def test_the_mask_follows_the_images_device(params):
    """meta stands in for an accelerator: the mask is drawn on the CPU, then moved to the images' device."""
    model, _ = build(params)
    model = model.to("meta")
    loss, out = model(torch.empty(4, 1, 8, 8, device="meta"), torch.Generator().manual_seed(0))
    assert loss.device.type == out["mask"].device.type == "meta"
