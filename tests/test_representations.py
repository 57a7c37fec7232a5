"""The representation analyses of pipeline/evaluation/representations.py against independent computations: each
block's output (the blocks run by hand, before the final norm), the mean attention distance (cls dropped,
patch attention renormalised, distance-weighted, averaged over queries and images; a query with no patch mass
counts 0), the top-k singular value share of the layer-normalised patch tokens (default k = 5), the per-layer
features and CKA, and what each figure draws (data, labels, titles, legends, axis limits)."""
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluation import representations as rep
from pipeline.models.encoder import build_encoder

MODEL = dict(arch="vit_tiny_patch16_224", patch_size=2, embed_dim=32, depth=3, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py: torch on one thread


@pytest.fixture
def encoder():
    return build_encoder(MODEL, 8, 1, seed=0)


@pytest.fixture
def images():
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def blocks_by_hand(encoder, images):
    with torch.inference_mode():
        x, out = encoder.embed(images), []
        for block in encoder.vit.blocks:
            x = block(x)
            out.append(x)
    return out


def test_layer_features_are_each_blocks_patch_tokens_before_the_final_norm(encoder, images):
    encoder.train()
    features = rep.layer_features(encoder, images)
    assert not encoder.training
    expected = blocks_by_hand(encoder, images)
    assert len(features) == 3
    for f, h in zip(features, expected):
        assert torch.allclose(f, h[:, 1:].reshape(-1, 32), atol=1e-6)


def test_singular_value_share_is_the_mean_top_k_share_of_layer_normalised_patch_tokens(encoder, images):
    encoder.train()
    share = rep.singular_value_share(encoder, images)
    assert not encoder.training
    expected = []
    for h in blocks_by_hand(encoder, images):
        tokens = F.layer_norm(h[:, 1:].double(), (32,))
        s = torch.linalg.svdvals(tokens)
        expected.append((s[:, :5].sum(-1) / s.sum(-1)).mean())
    assert torch.allclose(share.double(), torch.stack(expected), atol=1e-5)
    assert torch.allclose(rep.singular_value_share(encoder, images, top_k=2).double(),
                          torch.stack([(torch.linalg.svdvals(F.layer_norm(h[:, 1:].double(), (32,)))[:, :2].sum(-1)
                                        / torch.linalg.svdvals(F.layer_norm(h[:, 1:].double(), (32,))).sum(-1)).mean()
                                       for h in blocks_by_hand(encoder, images)]), atol=1e-5)


def test_top_k_share_per_matrix_in_double_precision():
    tokens = torch.zeros(2, 4, 3)
    tokens[0, 0, 0], tokens[0, 1, 1], tokens[0, 2, 2] = 3.0, 2.0, 1.0      # singular values 3, 2, 1
    tokens[1, 0, 0], tokens[1, 1, 1] = 1.0, 1.0                            # 1, 1, 0
    assert rep.top_k_share(tokens, 1).tolist() == pytest.approx([0.5, 0.5])
    assert rep.top_k_share(tokens, 2).tolist() == pytest.approx([5 / 6, 1.0])
    assert rep.top_k_share(tokens, 1).dtype == torch.float32
    with pytest.raises(ValueError, match="^top_k must be at least 1, got 0$"):
        rep.top_k_share(tokens, 0)
    assert rep.top_k_share(tokens, 1).shape == (2,)


def test_top_k_share_computes_in_double():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1e-5]]])
    share = rep.top_k_share(a, 1)
    assert share.item() == pytest.approx(1 / (1 + 1e-5), rel=1e-7)
    assert share.item() == torch.tensor(1 / (1 + 1e-5), dtype=torch.float32).item()


def test_attention_distance_is_averaged_over_queries_and_images():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 3, 5, 5, generator=g)                   # B=2, 3 heads, cls + a 2x2 grid
    dist = rep.patch_distances(2, 4).double()
    expected = torch.zeros(3, dtype=torch.float64)
    for b in range(2):
        for h in range(3):
            for q in range(4):
                w = maps[b, h, q + 1, 1:].double()
                expected[h] += (w / w.sum() * dist[q]).sum() / 8
    got = rep.attention_distance_from_maps(maps, 2, 4)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), expected, atol=1e-6)


def test_a_query_attending_only_to_cls_counts_zero():
    maps = torch.zeros(1, 1, 5, 5)
    maps[0, 0, 1:, 0] = 1.0                      # every patch query attends to cls only
    maps[0, 0, 1, 0], maps[0, 0, 1, 4] = 0.0, 1.0  # but query 0 attends to the opposite corner
    got = rep.attention_distance_from_maps(maps, 2, 1)
    assert not torch.isnan(got).any() and got.tolist() == pytest.approx([math.sqrt(2) / 4])


def test_patch_distances_are_pixel_euclidean_in_row_major_order():
    d = rep.patch_distances(3, 2)
    assert d.shape == (9, 9) and d.dtype == torch.float64
    coords = [(r, c) for r in range(3) for c in range(3)]
    expected = torch.tensor([[2 * math.dist(a, b) for b in coords] for a in coords], dtype=torch.float64)
    assert torch.allclose(d, expected)
    assert d[0, 1].item() == 2.0 and d[0, 3].item() == 2.0 and d[1, 5].item() == pytest.approx(2 * math.sqrt(2))
    assert d[2, 6].item() == pytest.approx(2 * math.sqrt(8))


def test_mean_attention_distance_per_block_and_head_from_the_encoders_maps(encoder, images):
    encoder.train()
    distance = rep.mean_attention_distance(encoder, images)
    assert not encoder.training and distance.shape == (3, 2)
    maps = rep.attention_maps(encoder, images)
    for layer in range(3):
        expected = rep.attention_distance_from_maps(maps[layer], 4, 2)      # grid 4, patch 2 px
        assert torch.allclose(distance[layer], expected, atol=1e-6)


def test_cka_per_layer_is_linear_cka_of_the_same_blocks(encoder, images):
    other = build_encoder(MODEL, 8, 1, seed=1)
    got = rep.cka_per_layer(encoder, other, images)
    fa, fb = blocks_by_hand(encoder, images), blocks_by_hand(other, images)
    expected = [rep.linear_cka(a[:, 1:].reshape(-1, 32), b[:, 1:].reshape(-1, 32)) for a, b in zip(fa, fb)]
    assert got.shape == (3,) and torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    with pytest.raises(ValueError, match="^CKA per layer needs encoders of equal depth, got 3 and 1$"):
        rep.cka_per_layer(encoder, build_encoder(MODEL, 8, 1, seed=0, depth=1), images)


def test_linear_cka_of_a_hand_computed_case():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    y = torch.tensor([[1.0], [2.0], [0.0], [5.0]])
    xc, yc = (x - x.mean(0)).double(), (y - y.mean(0)).double()
    expected = (torch.linalg.matrix_norm(yc.T @ xc) ** 2
                / (torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc))).item()
    assert rep.linear_cka(x, y) == pytest.approx(expected, rel=1e-12)
    assert rep.linear_cka(x, x + 5.0) == pytest.approx(1.0)          # centred: a shift changes nothing
    with pytest.raises(ValueError, match=r"^CKA needs the same examples in both: 4 != 3 rows$"):
        rep.linear_cka(x, y[:3])


# ---- figures -------------------------------------------------------------------------------------------

@pytest.fixture
def saved(monkeypatch):
    figures = []
    monkeypatch.setattr(rep, "save_png", lambda fig, path: figures.append((fig, path)))
    return figures


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_attention_distance_figure(saved, tmp_path):
    a = torch.tensor([[1.0, 3.0], [2.0, 6.0], [0.5, 0.5]])          # 3 layers, 2 heads
    b = torch.tensor([[4.0, 4.0], [1.0, 2.0], [3.0, 1.0]])
    rep.plot_attention_distance({"mae": a, "dbot": b}, tmp_path / "d.png")
    (fig, path), = saved
    assert path == tmp_path / "d.png"
    axes = fig.axes
    assert len(axes) == 2 and axes[0].get_shared_y_axes().joined(axes[0], axes[1])
    for ax, (name, table) in zip(axes, (("mae", a), ("dbot", b))):
        assert ax.get_title() == name and ax.get_xlabel() == "layer"
        dots, = ax.collections
        offsets = torch.tensor(dots.get_offsets().tolist())
        assert torch.equal(offsets[:, 0], torch.tensor([1.0, 1, 2, 2, 3, 3]))
        assert torch.equal(offsets[:, 1], table.flatten())
        line, = ax.get_lines()
        assert list(line.get_xdata()) == [1, 2, 3] and torch.allclose(torch.tensor(line.get_ydata()), table.mean(1))
        assert dots.get_label() == "head" and line.get_label() == "mean over heads"
        assert ax.xaxis.get_major_locator()._integer
    assert axes[0].get_ylabel() == "mean attention distance (pixels)"
    assert legend_texts(axes[0]) == ["head", "mean over heads"] and axes[1].get_legend() is None


def test_singular_value_share_figure(saved, tmp_path):
    rep.plot_singular_value_share({"mae": torch.tensor([0.5, 0.25]), "dbot": torch.tensor([0.75, 0.5])},
                                  tmp_path / "s.png")
    (fig, path), = saved
    ax, = fig.axes
    assert path == tmp_path / "s.png"
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["mae", "dbot"]
    assert list(lines[0].get_xdata()) == [1, 2] and list(lines[0].get_ydata()) == [0.5, 0.25]
    assert list(lines[1].get_ydata()) == [0.75, 0.5]
    assert ax.get_xlabel() == "layer" and ax.get_ylabel() == "top-k singular value share"
    assert ax.get_title() == "Normalised patch tokens: a low share = tokens spread over many directions"
    assert legend_texts(ax) == ["mae", "dbot"] and ax.xaxis.get_major_locator()._integer


def test_cka_figure_of_one_tensor_and_of_pairs(saved, tmp_path):
    rep.plot_cka(torch.tensor([0.9, 0.8, 0.7]), tmp_path / "c.png")
    rep.plot_cka({("mae", "dbot"): torch.tensor([0.5, 0.6]), "a vs b": torch.tensor([0.1, 0.2])}, tmp_path / "p.png")
    (fig, path), (fig2, path2) = saved
    assert path == tmp_path / "c.png" and path2 == tmp_path / "p.png"
    ax, = fig.axes
    line, = ax.get_lines()
    assert line.get_label() == "CKA" and list(line.get_xdata()) == [1, 2, 3]
    assert torch.allclose(torch.tensor(line.get_ydata()), torch.tensor([0.9, 0.8, 0.7]))
    assert ax.get_ylim() == (0, 1.05) and ax.get_ylabel() == "linear CKA" and ax.get_xlabel() == "layer"
    assert ax.get_title() == "Layer-wise similarity of patch-token features" and legend_texts(ax) == ["CKA"]
    ax2, = fig2.axes
    assert [line.get_label() for line in ax2.get_lines()] == ["mae vs dbot", "a vs b"]
    assert legend_texts(ax2) == ["mae vs dbot", "a vs b"]


def test_cka_figure_with_stage_means_draws_them_in_a_first_panel(saved, tmp_path):
    rep.plot_cka({"x vs y": torch.tensor([0.5, 0.6])}, tmp_path / "c.png",
                 stage_means={"1": torch.tensor([0.2, 0.3]), "2": torch.tensor([0.4, 0.5])})
    (fig, _), = saved
    first, second = fig.axes
    assert [line.get_label() for line in first.get_lines()] == ["stage 1", "stage 2"]
    assert list(first.get_lines()[1].get_ydata()) == pytest.approx([0.4, 0.5])
    assert first.get_title() == "Teacher-swap study: mean CKA between chains"
    assert first.get_ylabel() == "linear CKA" and second.get_ylabel() == ""
    assert second.get_title() == "Layer-wise similarity of patch-token features"
    assert [line.get_label() for line in second.get_lines()] == ["x vs y"]
    assert first.get_ylim() == (0, 1.05) and second.get_ylim() == (0, 1.05)
    assert fig.get_figwidth() == 12
