"""Unit tests of the representation analyses (attention distance, singular value share, CKA) and their plots."""
import math

import pytest
import torch
from torch import nn

from pipeline.evaluation import representations
from pipeline.models.encoder import build_encoder

MODEL = dict(arch="vit_tiny_patch16_224", patch_size=2, embed_dim=32, depth=2, num_heads=2)
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py: torch on one thread


@pytest.fixture
def encoder():
    return build_encoder(MODEL, 8, 1, seed=0)


@pytest.fixture
def images():
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_maps_reproduce_each_block_attention_output(encoder, images, qk_norm):
    if qk_norm:                                  # q_norm / k_norm must be applied, as timm's qk_norm ViTs do
        for block in encoder.vit.blocks:
            block.attn.q_norm, block.attn.k_norm = nn.LayerNorm(16), nn.LayerNorm(16)
            nn.init.normal_(block.attn.q_norm.weight)
    maps = representations.attention_maps(encoder, images)
    assert not encoder.training and len(maps) == 2 and all(m.shape == (3, 2, 17, 17) for m in maps)
    with torch.inference_mode():
        x = encoder.embed(images)
        for block, probs in zip(encoder.vit.blocks, maps):
            assert torch.allclose(probs.sum(-1), torch.ones(3, 2, 17), atol=1e-6) and (probs >= 0).all()
            attn = block.attn
            v = attn.qkv(block.norm1(x)).reshape(3, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
            mixed = attn.proj(attn.norm((probs @ v).transpose(1, 2).reshape(3, 17, 32)))
            assert torch.allclose(mixed, attn(block.norm1(x)), atol=1e-5)
            x = block(x)
        assert torch.allclose(encoder.vit.norm(x), encoder(images), atol=1e-6)   # same forward pass


def test_attention_distance_of_hand_built_maps():
    self_only = torch.zeros(2, 3, 5, 5)
    self_only[:, :, 0, 0] = 1.0
    self_only[:, :, 1:, 0] = 0.5                  # mass on cls is dropped, the rest renormalised
    self_only[:, :, 1:, 1:] = 0.5 * torch.eye(4)
    assert torch.equal(representations.attention_distance_from_maps(self_only, 2, 1), torch.zeros(3))
    uniform = torch.full((1, 2, 5, 5), 0.2)
    expected = (2 + math.sqrt(2)) / 4              # distances 0, 1, 1, sqrt(2) from any patch of a 2x2 grid
    assert representations.attention_distance_from_maps(uniform, 2, 1).tolist() == pytest.approx([expected] * 2)
    assert representations.attention_distance_from_maps(uniform, 2, 16).tolist() == pytest.approx([16 * expected] * 2)
    assert representations.patch_distances(3, 1)[0, 8].item() == pytest.approx(2 * math.sqrt(2))   # corner to corner


def test_mean_attention_distance_shape_and_range(encoder, images):
    distance = representations.mean_attention_distance(encoder, images)
    assert distance.shape == (2, 2)
    assert (distance >= 0).all() and (distance <= math.sqrt(2) * 3 * 2).all()
    maps = representations.attention_maps(encoder, images)
    assert torch.allclose(distance[1], representations.attention_distance_from_maps(maps[1], 4, 2))


def test_top_k_share_of_rank_one_and_orthogonal_tokens():
    rank_one = torch.randn(2, 6, 1) * torch.randn(2, 1, 8)
    assert representations.top_k_share(rank_one, 1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    orthogonal = torch.linalg.qr(torch.randn(2, 8, 6)).Q.transpose(1, 2)      # 6 orthonormal tokens in 8-d
    assert representations.top_k_share(orthogonal, 2).tolist() == pytest.approx([2 / 6] * 2, abs=1e-6)
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        representations.top_k_share(orthogonal, 0)


def test_singular_value_share_shape_and_range(encoder, images):
    share = representations.singular_value_share(encoder, images, top_k=3)
    assert share.shape == (2,) and ((share > 0) & (share <= 1 + 1e-6)).all()
    assert (representations.singular_value_share(encoder, images, top_k=16) >= share - 1e-6).all()


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 16, generator=g), torch.randn(2000, 16, generator=g)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=g)).Q
    assert representations.linear_cka(x, x) == pytest.approx(1.0)
    assert representations.linear_cka(x, 3.0 * x @ rotation + 1.0) == pytest.approx(1.0)
    mixed = x + 0.5 * y
    assert representations.linear_cka(x, 2.5 * mixed @ rotation) == pytest.approx(representations.linear_cka(x, mixed))
    assert representations.linear_cka(x, mixed) == pytest.approx(representations.linear_cka(mixed, x))
    assert 0 <= representations.linear_cka(x, y) < 0.1
    with pytest.raises(ValueError, match="same examples"):
        representations.linear_cka(x, y[:10])


def test_layer_features_and_cka_per_layer(encoder, images):
    features = representations.layer_features(encoder, images)
    assert [f.shape for f in features] == [(3 * 16, 32)] * 2
    assert torch.allclose(representations.cka_per_layer(encoder, encoder, images), torch.ones(2, dtype=torch.float32))
    other = representations.cka_per_layer(encoder, build_encoder(MODEL, 8, 1, seed=1), images)
    assert other.shape == (2,) and ((other >= 0) & (other <= 1)).all()
    with pytest.raises(ValueError, match="equal depth, got 2 and 1"):
        representations.cka_per_layer(encoder, build_encoder(MODEL, 8, 1, seed=0, depth=1), images)


def test_plots_are_written_as_png(encoder, images, tmp_path):
    other = build_encoder(MODEL, 8, 1, seed=1)
    encoders = {"mae": encoder, "dbot_stage1": other}
    representations.plot_attention_distance({k: representations.mean_attention_distance(e, images)
                                             for k, e in encoders.items()},
                                     tmp_path / "distance.png")
    representations.plot_singular_value_share({k: representations.singular_value_share(e, images)
                                               for k, e in encoders.items()},
                                       tmp_path / "share.png")
    cka = representations.cka_per_layer(encoder, other, images)
    representations.plot_cka({("mae", "dbot_stage1"): cka, "mae vs mae": torch.ones(2)}, tmp_path / "cka_pairs.png")
    representations.plot_cka(cka, tmp_path / "cka.png")
    from pipeline.reporting.figures import attention_grid

    attention_grid(encoder, (images * 40 + 100).clamp(0, 255).to(torch.uint8), [100.0], [40.0], tmp_path / "heads.png")
    for name in ("distance", "share", "cka_pairs", "cka", "heads"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cka.png", "cka_pairs.png", "distance.png", "heads.png",
                                                          "share.png"]
