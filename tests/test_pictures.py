"""pipeline.reporting.figures and the methods' picture() hooks on the tiny preset (8x8 images, 2x2 patches,
16 tokens)."""
import math

import pytest
import torch
from PIL import Image

from pipeline import config
from pipeline.data.datasets import normalize
from pipeline.methods import METHODS, NEEDS_TEACHER
from pipeline.models import losses
from pipeline.models.encoder import build_encoder
from pipeline.models.teacher import FrozenTeacher
from pipeline.reporting import figures

PICTURED = ["bootmae", "dbot", "mae", "rcmae", "sdae"]
PIXELS = {"mae", "rcmae", "bootmae"}
MEAN, STD = [0.3], [0.4]


@pytest.fixture(scope="module")
def params():
    return config.load("tiny")


def make(name, params, seed=0):
    teacher = FrozenTeacher(build_encoder(params["model"], 8, 1, seed=1)) if name in NEEDS_TEACHER else None
    return METHODS[name](params, 1, seed, teacher)


def images(n=8, seed=0):
    return torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", PICTURED)
def test_picture_kind_and_shapes(name, params):
    model = make(name, params).eval()
    x = normalize(images(4), MEAN, STD)
    pic = model.picture(x, gen())
    assert pic["kind"] == ("pixels" if name in PIXELS else "features")
    assert pic["mask"].shape == (4, 16) and (pic["mask"].sum(1) == 12).all()
    features = pic if pic["kind"] == "features" else pic.get("features")
    if pic["kind"] == "pixels":
        assert pic["pred"].shape == (4, 16, 4) and isinstance(pic["norm_pix"], bool)
    if features is not None:
        assert features["pred"].shape == features["target"].shape == (4, 16, 32)
        assert torch.equal(features["mask"], pic["mask"])
    assert (name == "bootmae") == (pic["kind"] == "pixels" and features is not None)
    if name == "sdae":       # targets only where the teacher's folds are: the 12 hidden patches (3 folds of 4)
        has_target = torch.isfinite(features["target"]).all(-1)
        assert torch.equal(has_target, pic["mask"].bool())
        assert torch.equal(torch.isfinite(features["pred"]).all(-1), has_target)
    elif features is not None:
        assert torch.isfinite(features["target"]).all() and torch.isfinite(features["pred"]).all()
    assert not any(t.requires_grad for t in (pic["pred"], pic["mask"]))


@pytest.mark.parametrize("name", PICTURED)
def test_forward_loss_is_bit_identical_around_a_picture(name, params, tmp_path):
    """picture() changes no weight, no mode and no forward behaviour: the same seed gives the same loss (a
    training forward draws drop-path from the step's generator, as the engine runs it: step_draws)."""
    from pipeline.models.encoder import step_draws

    model = make(name, params).train()
    modes = {k: m.training for k, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = normalize(images(4), MEAN, STD)
    with step_draws(g := gen(3)):
        before, out = model(x, g)
    figures.reconstruction_grid(model, images(4), MEAN, STD, 3, tmp_path / "grid.png")
    with step_draws(g := gen(3)):
        after, _ = model(x, g)
    assert torch.equal(before, after)
    assert {k: m.training for k, m in model.named_modules()} == modes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model.picture(x, gen(3))["mask"], out["mask"])     # the mask forward draws


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_picture_reproduces_its_loss(norm_pix, params):
    model = make("mae", config.merge(params, {"mae": {"norm_pix_loss": norm_pix}})).eval()
    x = normalize(images(4), MEAN, STD)
    loss, _ = model(x, gen())
    pic = model.picture(x, gen())
    assert pic["norm_pix"] is norm_pix
    assert torch.equal(losses.mse(pic["pred"], model.target(x), pic["mask"]), loss)


@pytest.mark.parametrize("name", PICTURED)
def test_grid_png_is_written(name, params, tmp_path):
    path = tmp_path / f"{name}.png"
    numbers = figures.reconstruction_grid(make(name, params), images(), MEAN, STD, 0, path, n=6, method=name)
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        width, height = im.size
    rows = {"mae": 4, "rcmae": 4, "bootmae": 6, "dbot": 4, "sdae": 4}[name]
    assert 500 < width < 2000 and 120 * rows < height < 250 * rows + 300
    assert numbers["mask_ratio"] == 0.75
    assert all(isinstance(v, float) and math.isfinite(v) for v in numbers.values())
    assert ("mse_hidden" in numbers) == (name in PIXELS)
    assert ("cosine_hidden" in numbers) == ("r2_hidden" in numbers) == (name not in {"mae", "rcmae"})
    assert -1 <= numbers.get("cosine_hidden", 0) <= 1


@pytest.mark.parametrize("norm_pix", [False, True])
def test_a_perfect_mae_decoder_reconstructs_the_original(norm_pix, params, monkeypatch, tmp_path):
    model = make("mae", config.merge(params, {"mae": {"norm_pix_loss": norm_pix}}))
    monkeypatch.setattr(model, "reconstruct", lambda imgs, mask: model.target(imgs))
    numbers = figures.reconstruction_grid(model, images(), MEAN, STD, 0, tmp_path / "perfect.png")
    assert numbers["mse_hidden"] < 1e-10 and numbers["target_mse_hidden"] == 0
    x = normalize(images(), MEAN, STD)
    rows = figures.pixel_rows(model.picture(x, gen()), x, MEAN, STD)
    original = images().float() / 255
    assert torch.allclose(rows["original"], original, atol=1e-6)
    tol = 1e-5 if norm_pix else 1e-6                     # norm_pix: var + eps, inverted with the same eps
    assert torch.allclose(rows["reconstruction"], original, atol=tol)
    assert torch.allclose(rows["reconstruction + visible"], original, atol=tol)
    hidden = figures._hidden_pixels(model.picture(x, gen())["mask"], x)
    assert (rows["masked input"][hidden] == figures.GREY).all()
    assert torch.equal(rows["masked input"][~hidden], rows["original"][~hidden])


def test_visible_patches_are_pasted_into_the_reconstruction(params):
    model = make("mae", params).eval()
    x = normalize(images(), MEAN, STD)
    pic = model.picture(x, gen())
    rows = figures.pixel_rows(pic, x, MEAN, STD)
    hidden = figures._hidden_pixels(pic["mask"], x)
    pasted = rows["reconstruction + visible"]
    assert torch.equal(pasted[~hidden], rows["original"][~hidden])
    assert torch.equal(pasted[hidden], rows["reconstruction"][hidden])


def test_unnormalize_inverts_normalize_per_patch_and_per_channel():
    patches = torch.rand(2, 5, 12, generator=gen())
    assert torch.allclose(figures.unnormalize_patches(losses.normalize_patches(patches), patches), patches,
                          atol=1e-5)
    per_channel = losses.normalize_patches_per_channel(patches, 3)
    assert torch.allclose(figures.unnormalize_patches(per_channel, patches, 3), patches, atol=1e-5)


def test_pca_colours_are_identical_for_equal_features():
    target = torch.randn(3, 16, 32, generator=gen())
    rgb_t, rgb_p = figures.pca_colors(target, target.clone())
    assert rgb_t.shape == (3, 16, 3) and torch.equal(rgb_t, rgb_p)
    assert rgb_t.min() == 0 and rgb_t.max() == 1
    other_t, other_p = figures.pca_colors(target, torch.randn(3, 16, 32, generator=gen(1)))
    assert not torch.equal(other_t, other_p) and 0 <= other_p.min() and other_p.max() <= 1


def test_pca_colours_leave_tokens_without_target_out():
    target = torch.randn(2, 16, 8, generator=gen())
    target[:, :4] = float("nan")
    rgb_t, rgb_p = figures.pca_colors(target, target.clone())
    assert torch.isnan(rgb_t[:, :4]).all() and torch.isfinite(rgb_t[:, 4:]).all()
    assert torch.equal(rgb_t.nan_to_num(), rgb_p.nan_to_num())


def test_feature_grid_of_a_perfect_prediction(params, monkeypatch, tmp_path):
    model = make("dbot", params)
    hook = model.picture
    monkeypatch.setattr(model, "picture", lambda imgs, g: dict(pic := hook(imgs, g), pred=pic["target"]))
    numbers = figures.reconstruction_grid(model, images(), MEAN, STD, 0, tmp_path / "dbot.png")
    assert numbers["cosine_hidden"] == pytest.approx(1.0, abs=1e-6) and numbers["r2_hidden"] == pytest.approx(1.0)


def test_predicting_the_mean_token_has_r2_zero_whatever_its_cosine():
    target = 5 + torch.randn(2, 16, 8, generator=gen(), dtype=torch.float64)        # a large common part
    mask = torch.ones(2, 16)
    numbers = figures._feature_numbers({"mask": mask, "target": target,
                                         "pred": target.flatten(0, 1).mean(0).expand(2, 16, 8)})
    assert numbers["r2_hidden"] == pytest.approx(0.0, abs=1e-9) and numbers["cosine_hidden"] > 0.9


def test_same_seed_same_picture(params):
    model = make("bootmae", params).eval()
    x = normalize(images(4), MEAN, STD)
    a, b, c = (model.picture(x, gen(seed)) for seed in (5, 5, 6))
    assert torch.equal(a["pred"], b["pred"]) and torch.equal(a["features"]["target"], b["features"]["target"])
    assert torch.equal(a["mask"], b["mask"]) and not torch.equal(a["mask"], c["mask"])


def test_attention_grid_writes_a_png_and_keeps_the_mode(params, tmp_path):
    encoder = build_encoder(params["model"], 8, 1, seed=0).train()
    figures.attention_grid(encoder, images(), MEAN, STD, tmp_path / "attention.png", n=3)
    assert encoder.training and all(m.training for m in encoder.modules())
    with Image.open(tmp_path / "attention.png") as im:
        width, height = im.size                      # 3 rows, 1 + 2 heads columns
    assert 300 < width < 1000 and 300 < height < 1000
