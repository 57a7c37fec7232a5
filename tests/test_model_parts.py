"""Unit tests of the shared model parts: encoder adapter, decoder, masking, losses, frozen teacher."""
import re

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.hardware import attention_kernels
from pipeline.models import losses
from pipeline.models.decoder import CrossAttention, Decoder
from pipeline.models.encoder import build_encoder, load_encoder, save_encoder, sincos_2d
from pipeline.models.masking import random_masking
from pipeline.models.teacher import FrozenTeacher

MODEL = dict(arch="vit_tiny_patch16_224", patch_size=2, embed_dim=32, depth=2, num_heads=2)


def test_encoder_visible_tokens_match_full_image_on_the_kept_positions():
    enc = build_encoder(MODEL, 8, 1, seed=0).eval()
    x = torch.randn(3, 1, 8, 8)
    mask = random_masking(3, enc.num_patches, 0.75, torch.Generator().manual_seed(0))
    vis = enc(x, mask.ids_keep)
    assert vis.shape == (3, 1 + 4, 32)
    # the tokens entering the first block: cls, then the full image's patch tokens at ids_keep, in that order
    tokens = enc.vit.patch_embed(x) + enc.vit.pos_embed[:, 1:]
    embedded = enc.embed(x, mask.ids_keep)
    for b in range(3):
        for j, patch in enumerate(mask.ids_keep[b].tolist()):
            assert torch.allclose(embedded[b, 1 + j], tokens[b, patch], atol=1e-5), (b, j, patch)
    # the hidden patches' pixels never reach the visible tokens
    hidden = mask.mask.bool().view(3, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]
    assert torch.equal(enc(x.masked_fill(hidden, 0.0), mask.ids_keep), vis)
    assert not torch.equal(enc(x.masked_fill(~hidden, 0.0), mask.ids_keep), vis)


def test_patch_embedding_as_a_matmul_equals_timms_conv():
    enc = build_encoder(dict(MODEL, patch_size=4), 12, 3, seed=0)
    x = torch.randn(2, 3, 12, 12)
    conv = enc.vit.patch_embed(x) + enc.vit.pos_embed[:, 1:]
    assert torch.allclose(enc.embed(x)[:, 1:], conv, atol=1e-5)
    enc.embed(x).sum().backward()                     # the gradient reaches the conv's weights
    assert enc.vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_attention_kernels_cpu_bf16_uses_explicit_attention_with_the_same_outputs():
    enc = build_encoder(MODEL, 8, 1, seed=0).eval()
    cross = CrossAttention(16, 2, 32)
    x, ctx, tokens = torch.randn(2, 1, 8, 8), torch.randn(2, 5, 32), torch.randn(2, 9, 16)
    fused_enc, fused_cross = enc(x), cross(tokens, ctx)
    for bf16, fused in ((True, False), (False, True)):
        with attention_kernels(torch.nn.ModuleList([enc, cross]), "cpu", bf16):
            flags = {m.fused_attn for m in [*enc.modules(), cross] if hasattr(m, "fused_attn")}
            assert flags == {fused}
            assert (torch.allclose(enc(x), fused_enc, atol=1e-5)
                    and torch.allclose(cross(tokens, ctx), fused_cross, atol=1e-5))
    assert {m.fused_attn for m in [*enc.modules(), cross] if hasattr(m, "fused_attn")} == {True}   # restored


def test_encoder_returns_chosen_blocks_and_features():
    enc = build_encoder(MODEL, 8, 1, seed=0).eval()
    x = torch.randn(2, 1, 8, 8)
    out, blocks = enc(x, return_blocks=(0, -1))
    assert set(blocks) == {0, 1} and out.shape == (2, 17, 32)
    assert torch.allclose(enc.vit.norm(blocks[1]), out)
    assert enc.features(x, "cls").shape == (2, 32)
    assert torch.allclose(enc.features(x, "mean"), out[:, 1:].mean(1))


def test_same_seed_same_init_and_frozen_sincos_positions():
    a, b, c = (build_encoder(MODEL, 8, 1, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.vit.blocks[0].attn.qkv.weight, c.vit.blocks[0].attn.qkv.weight)
    assert torch.equal(a.vit.pos_embed[0], sincos_2d(32, 4)) and not a.vit.pos_embed.requires_grad


def test_decoder_restores_grid_order():
    """Each visible token lands at its grid position (ids_keep), mask tokens at the others, positions added in
    grid order: the decoder equals the same blocks run on tokens placed one by one."""
    dec = Decoder(grid=4, in_dim=32, dim=16, depth=1, heads=2, out_dim=12).eval()
    with torch.no_grad():
        dec.mask_token.normal_(generator=torch.Generator().manual_seed(2))
    mask = random_masking(2, 16, 0.75, torch.Generator().manual_seed(1))
    latent = torch.randn(2, 5, 32)
    out = dec(latent, mask.ids_restore)
    assert out.shape == (2, 17, 12)
    for b in range(2):
        grid = [dec.mask_token[0, 0]] * 16
        for j, patch in enumerate(mask.ids_keep[b].tolist()):
            grid[patch] = dec.embed(latent[b, 1 + j])
        x = torch.stack([dec.embed(latent[b, 0]), *grid])[None] + dec.pos
        for block in dec.blocks:
            x = block(x)
        assert torch.allclose(out[b], dec.head(dec.norm(x))[0], atol=1e-5), b


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_random_masking_counts_and_consistency(ratio):
    m = random_masking(4, 16, ratio, torch.Generator().manual_seed(0))
    keep = int(16 * (1 - ratio))
    assert m.ids_keep.shape == (4, keep)
    assert (m.mask.sum(1) == 16 - keep).all()
    assert (torch.gather(m.mask, 1, m.ids_keep) == 0).all()          # kept = unmasked
    shuffled = torch.cat([m.ids_keep, torch.gather(torch.argsort(m.ids_restore, 1), 1,
                          torch.arange(keep, 16).expand(4, -1))], 1)
    assert (torch.sort(shuffled, 1).values == torch.arange(16)).all()
    again = random_masking(4, 16, ratio, torch.Generator().manual_seed(0))
    assert torch.equal(m.ids_keep, again.ids_keep)


def test_patchify_roundtrip_and_norm():
    x = torch.randn(2, 3, 8, 8)
    p = losses.patchify(x, 2)
    assert p.shape == (2, 16, 12)
    assert torch.equal(losses.unpatchify(p, 2, 3), x)
    n = losses.normalize_patches(p)
    assert torch.allclose(n.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(n.var(-1), torch.ones(2, 16), atol=1e-3)


def test_losses_only_count_masked_tokens():
    pred, target = torch.zeros(1, 4, 3), torch.tensor([[[1.0] * 3, [2.0] * 3, [3.0] * 3, [4.0] * 3]])
    mask = torch.tensor([[1.0, 0, 0, 1]])
    assert losses.mse(pred, target, mask).item() == pytest.approx((1 + 16) / 2)
    # smooth-L1 with beta 2: |d|<2 -> 0.5 d^2 / 2, else |d| - 1
    assert losses.smooth_l1(pred, target, mask, beta=2.0).item() == pytest.approx((0.25 + 3) / 2)
    assert losses.with_cls(mask).tolist() == [[1.0, 1, 0, 0, 1]]
    s = losses.standardize_tokens(torch.randn(2, 5, 8) * 3 + 1)
    assert torch.allclose(s.mean(-1), torch.zeros(2, 5), atol=1e-5)
    t = torch.randn(2, 5, 8)                                  # eps reaches the layer norm
    centred = t - t.mean(-1, keepdim=True)
    assert torch.allclose(losses.standardize_tokens(t, eps=1.0),
                          centred / (centred.pow(2).mean(-1, keepdim=True) + 1.0).sqrt(), atol=1e-6)


def test_frozen_teacher_gets_no_gradient_and_stays_in_eval():
    teacher = FrozenTeacher(build_encoder(MODEL, 8, 1, seed=0))
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    seen = []                                 # the teacher's forward runs under inference_mode (no autograd at all)
    teacher.encoder.register_forward_hook(lambda *_: seen.append(torch.is_inference_mode_enabled()))
    t = teacher.targets(torch.randn(2, 1, 8, 8))
    assert t.shape == (2, 17, 32) and not t.requires_grad and not t.is_inference() and seen == [True]


def test_encoder_save_load_roundtrip_and_architecture_errors(tmp_path):
    enc = build_encoder(MODEL, 8, 1, seed=3)
    save_encoder(tmp_path / "e.safetensors", enc, {"node": "test"})
    params = {"model": MODEL, "data": {"img_size": 8}}
    loaded, meta = load_encoder(tmp_path / "e.safetensors", params["model"], 1, params["data"]["img_size"])
    assert meta["node"] == "test"
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), loaded.state_dict().values()))
    from safetensors.torch import save_file

    # an external timm state dict (no sidecar): its width, depth, patch and image size are read from the shapes
    wide = build_encoder(dict(MODEL, embed_dim=64, depth=3, num_heads=1), 8, 1, seed=0)   # 64-wide heads as timm
    save_file(wide.vit.state_dict(), str(tmp_path / "external.safetensors"))
    loaded, meta = load_encoder(tmp_path / "external.safetensors", params["model"], 1, params["data"]["img_size"])
    assert meta == {} and (loaded.embed_dim, len(loaded.vit.blocks), loaded.grid) == (64, 3, wide.grid)
    assert torch.equal(loaded(torch.ones(1, 1, 8, 8)), wide(torch.ones(1, 1, 8, 8)))
    state = {k: v for k, v in wide.vit.state_dict().items() if k != "norm.weight"}
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(PipelineError, match="does not fit the encoder architecture: missing: norm.weight"):
        load_encoder(tmp_path / "partial.safetensors", params["model"], 1, params["data"]["img_size"])
    torch.save(enc.vit.state_dict(), tmp_path / "pickle.safetensors")
    with pytest.raises(PipelineError, match="not a readable safetensors file"):
        load_encoder(tmp_path / "pickle.safetensors", params["model"], 1, params["data"]["img_size"])


def test_an_encoder_file_that_does_not_fit_is_a_one_line_error_naming_it(tmp_path):
    """load_encoder's errors start with the file's path: an unknown layout is measured against the study's encoder
    for the images given, a recorded encoder that cannot be built and images it was not made for are refused."""
    from safetensors.torch import save_file

    from pipeline.checkpoint import save_tensors

    at = lambda path: "^" + re.escape(str(path))                  # the message starts with the path
    enc = build_encoder(MODEL, 8, 1, seed=3)
    path = tmp_path / "no_positions.safetensors"            # no pos_embed: a layout whose sizes cannot be read
    save_file({k: v for k, v in enc.vit.state_dict().items() if k != "pos_embed"}, str(path))
    with pytest.raises(PipelineError, match=at(path) + " does not fit the encoder architecture: missing: pos_embed$"):
        load_encoder(path, MODEL, 1, 8)
    path = tmp_path / "unbuildable.safetensors"
    save_tensors(path, enc.vit.state_dict(), {"model": dict(enc.config, num_heads=3)})      # 32 wide, 3 heads
    with pytest.raises(PipelineError, match=at(path) + ": cannot build the encoder its metadata describes"):
        load_encoder(path, MODEL, 1, 8)
    save_encoder(path, enc, {})
    with pytest.raises(PipelineError, match=at(path) + " takes 1-channel 8px images, but the data has 3-channel 8px"):
        load_encoder(path, MODEL, 3, 8)


def test_drop_path_rises_over_the_blocks_draws_from_the_step_and_is_off_in_eval():
    """Stochastic depth: rates 0 -> p over the blocks (timm's rule, dBOT's and SdAE's); the same init as without it;
    in training, draws from the step's generator (step_draws), the same global-batch draw cut to a rank's rows;
    in eval mode (teachers, probes, pictures) the identity."""
    from pipeline import ranks
    from pipeline.models.encoder import DropPath, step_draws

    model = dict(MODEL, depth=3)
    plain, dropped = build_encoder(model, 8, 1, seed=0), build_encoder(model, 8, 1, seed=0, drop_path=0.5)
    rates = [[m.drop_prob for m in b.modules() if isinstance(m, DropPath)] for b in dropped.vit.blocks]
    assert rates == [[], [0.25, 0.25], [0.5, 0.5]]                     # block 0 rate 0: no module
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), dropped.state_dict().values()))
    x = torch.randn(8, 1, 8, 8)
    assert torch.equal(dropped.eval()(x), plain.eval()(x))
    dropped.train()
    with step_draws(torch.Generator().manual_seed(1)):
        a = dropped(x)
    with step_draws(torch.Generator().manual_seed(1)):
        b = dropped(x)
    with step_draws(torch.Generator().manual_seed(2)):
        c = dropped(x)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain(x))
    halves = []
    for rows in (slice(0, 4), slice(4, 8)):                        # two ranks' rows of the same global batch
        with ranks.batch_rows(rows, 8), step_draws(torch.Generator().manual_seed(1)):
            halves.append(dropped(x[rows]))
    assert torch.allclose(torch.cat(halves), a, atol=1e-6)
    drop = DropPath(0.5).train()
    with step_draws(torch.Generator().manual_seed(0)):
        kept = drop(torch.ones(4000, 3))
    assert set(kept.unique().tolist()) == {0.0, 2.0} and abs(kept.mean().item() - 1) < 0.1   # scaled by 1 / keep


def test_decoder_drop_path_rises_over_its_blocks():
    from pipeline.models.encoder import DropPath

    dec = Decoder(grid=4, in_dim=32, dim=16, depth=3, heads=2, out_dim=12, drop_path=0.2)
    rates = [sorted({round(m.drop_prob, 6) for m in b.modules() if isinstance(m, DropPath)}) for b in dec.blocks]
    assert rates == [[], [0.1], [0.2]]


def test_depth_zero_teacher_targets_are_the_embedded_tokens_and_depth_k_has_k_blocks():
    """dBOT's stage-0 teacher cut to depth 0 (ViT-L/H): cls + patch embeddings + positions; depth k: k blocks."""
    full = build_encoder(dict(MODEL, depth=3), 8, 1, seed=0)
    x = torch.randn(2, 1, 8, 8)
    zero = full.truncated(0)
    assert len(zero.vit.blocks) == 0 and zero.config["depth"] == 0
    embedded = full.vit.patch_embed(x) + full.vit.pos_embed[:, 1:]
    cls = (full.vit.cls_token + full.vit.pos_embed[:, :1]).expand(2, -1, -1)
    target = FrozenTeacher(zero).targets(x)
    assert target.shape == (2, 17, 32) and torch.allclose(target, torch.cat([cls, embedded], 1), atol=1e-5)
    assert torch.allclose(FrozenTeacher(zero, final_norm=True).targets(x), full.vit.norm(target), atol=1e-5)
    two = full.truncated(2)
    with torch.no_grad():
        _, blocks = full.eval()(x, return_blocks=(1,))
    assert len(two.vit.blocks) == 2 and torch.allclose(FrozenTeacher(two).targets(x), blocks[1], atol=1e-5)
    with torch.no_grad():                                    # depth 3: the last block's output, or the normed one
        normed, blocks = full.eval()(x, return_blocks=(0, 1, 2))
    assert torch.equal(FrozenTeacher(full).targets(x), blocks[2]) and not torch.allclose(blocks[2], normed)
    assert torch.equal(FrozenTeacher(full, final_norm=True).targets(x), normed)
    with pytest.raises(ValueError, match="cannot keep 4 of 3 blocks"):
        full.truncated(4)


def test_depth_zero_encoder_saves_and_loads(tmp_path):
    zero = build_encoder(MODEL, 8, 1, seed=0).truncated(0)
    save_encoder(tmp_path / "t.safetensors", zero, {})
    loaded, _ = load_encoder(tmp_path / "t.safetensors", MODEL, 1, 8)
    x = torch.randn(2, 1, 8, 8)
    assert len(loaded.vit.blocks) == 0 and torch.equal(FrozenTeacher(loaded).targets(x), FrozenTeacher(zero).targets(x))


def test_timm_init_has_learnable_positions_and_timms_weights():
    """SdAE's official teacher (models_teacher.py: a timm VisionTransformer): timm's own init, not MAE's."""
    mae, timm_init = build_encoder(MODEL, 8, 1, seed=0), build_encoder(MODEL, 8, 1, seed=0, init="timm")
    assert timm_init.vit.pos_embed.requires_grad and not torch.equal(timm_init.vit.pos_embed[0], sincos_2d(32, 4))
    assert 0.01 < timm_init.vit.pos_embed.std().item() < 0.03                       # trunc-normal 0.02
    qkv = timm_init.vit.blocks[0].attn.qkv.weight
    assert abs(qkv.std().item() - 0.02) < 0.004                                      # trunc-normal 0.02
    assert mae.vit.blocks[0].attn.qkv.weight.std().item() > 0.1                     # MAE: xavier-uniform (fan 32 + 96)
    with pytest.raises(ValueError, match="unknown encoder init"):
        build_encoder(MODEL, 8, 1, seed=0, init="jax")


def test_cls_token_starts_normal_with_std_0_02_under_both_inits():
    """MAE: normal(std 0.02); timm 0.3.2 (SdAE's teacher): trunc-normal(std 0.02). 512 values per init."""
    wide = dict(MODEL, embed_dim=512, num_heads=8)
    for init in ("mae", "timm"):
        cls = build_encoder(wide, 8, 1, seed=0, init=init).vit.cls_token
        assert abs(cls.std().item() - 0.02) < 0.003 and abs(cls.mean().item()) < 0.003, init


def test_sincos_positions_are_maes_2d_embedding():
    """MAE's util/pos_embed.py get_2d_sincos_pos_embed, written out in numpy: per axis, sin then cos of
    position x 1 / 10000^(i / (D/4)), the first half of the width from the column (w), the second from the row (h);
    a zero row for cls. Computed in float64 and rounded once to float32: the same bits. A width not divisible by 4
    is refused."""
    import numpy as np

    for dim, grid in ((8, 3), (64, 8)):
        omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
        w, h = np.meshgrid(np.arange(grid), np.arange(grid))       # w varies along a row, as in MAE's grid[0]
        angles = [pos.reshape(-1, 1) * omega for pos in (w, h)]
        expected = np.concatenate([np.concatenate([np.sin(a), np.cos(a)], 1) for a in angles], 1)
        expected = torch.from_numpy(np.concatenate([np.zeros((1, dim)), expected])).float()
        assert torch.equal(sincos_2d(dim, grid), expected)
        assert torch.equal(sincos_2d(dim, grid, cls_token=False), expected[1:])
    with pytest.raises(ValueError, match=r"^sin-cos positions need a width divisible by 4, got 6$"):
        sincos_2d(6, grid)


def test_mae_init_zeroes_every_bias_and_draws_the_patch_projection_as_a_linear_layer():
    """MAE's init (models_mae.py initialize_weights): xavier-uniform for every Linear and for the patch conv viewed as
    (D, C*p*p), so its bound is sqrt(6 / (D + C*p*p)); zero biases; LayerNorms (1, 0)."""
    import math

    enc = build_encoder(MODEL, 8, 1, seed=0)
    for name, m in enc.vit.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm)):
            assert m.bias is not None and not m.bias.any(), name
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), name
    w = enc.vit.patch_embed.proj.weight                              # (32, 1, 2, 2): 128 draws
    bound = math.sqrt(6 / (32 + 1 * 2 * 2))
    assert 0.9 * bound < w.abs().max().item() <= bound
