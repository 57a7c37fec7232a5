"""The corruptions of pipeline/evaluation/robustness.py against their documented formulas (ImageNet-C's levels):
the noise is x + sigma * N(0, 1) drawn from the generator seeded by noise_seed (seed + 10 x corruption index +
severity), the blur is skimage's/scipy's Gaussian filter (truncate 4, borders 'nearest') with ImageNet-C's sigma
scaled from 224 px, the contrast scales each image's and channel's deviations from its mean; corrupt() works in
[0, 1], clips and rounds back to uint8, and refuses unknown corruptions and severities outside 1..5. The plot
draws top-1 in % per severity, one line per corruption, and the clean top-1 as a labelled line."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.evaluation import robustness


def images(n=3, channels=2, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(30, 226, (n, channels, size, size), dtype=torch.uint8, generator=g)


def to_uint8(x):
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def test_noise_seed_is_seed_plus_ten_per_corruption_plus_severity():
    assert [robustness.noise_seed(100, name, 3) for name in robustness.CORRUPTIONS] == [103, 113, 123]
    assert robustness.noise_seed(7, "contrast", 5) == 32


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_noise_is_x_plus_sigma_times_the_seeded_generators_normal_draws(severity):
    x = images()
    sigma = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    gen = torch.Generator().manual_seed(robustness.noise_seed(4, "gaussian_noise", severity))
    expected = to_uint8(x.float() / 255 + sigma * torch.randn(x.shape, generator=gen))
    assert torch.equal(robustness.corrupt(x, "gaussian_noise", severity, seed=4), expected)
    # the function itself draws from the generator it is given, in the input's dtype
    x64 = x.double() / 255
    gen_a, gen_b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    y = robustness.gaussian_noise(x64, severity, gen_a)
    assert y.dtype == torch.float64
    assert torch.allclose(y, x64 + sigma * torch.randn(x.shape, generator=gen_b, dtype=torch.float64))


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("size", [224, 40])
def test_blur_is_scipys_gaussian_filter_with_imagenet_c_sigma_scaled_to_the_size(severity, size):
    x = torch.rand(2, 2, size, size, generator=torch.Generator().manual_seed(severity), dtype=torch.float64)
    sigma = (1.0, 2.0, 3.0, 4.0, 6.0)[severity - 1] * size / 224
    assert robustness.blur_sigma(severity, size) == pytest.approx(sigma)
    y = robustness.gaussian_blur(x, severity)
    ref = np.stack([[ndimage.gaussian_filter(c, sigma, mode="nearest", truncate=4.0) for c in im] for im in x.numpy()])
    assert y.shape == x.shape and torch.allclose(y, torch.from_numpy(ref), atol=1e-10)


def test_blur_scales_sigma_by_the_height():
    """A non-square image's blur takes its sigma from the height (x.shape[-2])."""
    x = torch.rand(1, 1, 40, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = 3.0 * 40 / 224
    ref = ndimage.gaussian_filter(x[0, 0].numpy(), sigma, mode="nearest", truncate=4.0)
    assert torch.allclose(robustness.gaussian_blur(x, 3)[0, 0], torch.from_numpy(ref), atol=1e-10)


def test_tiny_blur_keeps_a_one_pixel_kernel():
    """At 8 px, severity 1 is sigma 1/28: round(4 sigma) = 0, the radius stays 1; the result is the image up to
    float64 rounding of the neighbours' weights exp(-392)."""
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = 8 / 224
    k = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / (2 * sigma * sigma))
    k = k / k.sum()
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")[0, 0]
    rows = k[0] * padded[:, :-2] + k[1] * padded[:, 1:-1] + k[2] * padded[:, 2:]
    expected = k[0] * rows[:-2] + k[1] * rows[1:-1] + k[2] * rows[2:]
    assert torch.allclose(robustness.gaussian_blur(x, 1)[0, 0], expected, atol=1e-15)


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_contrast_scales_deviations_from_each_images_channel_mean(severity):
    x = images().double() / 255
    x[1, 0] = x[1, 0] * 0.2                          # images and channels with different means
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    mean = x.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(robustness.contrast(x, severity), (x - mean) * c + mean, atol=1e-12)
    u8 = images()
    expected = to_uint8((u8.float() / 255 - (u8.float() / 255).mean(dim=(2, 3), keepdim=True)) * c
                        + (u8.float() / 255).mean(dim=(2, 3), keepdim=True))
    assert torch.equal(robustness.corrupt(u8, "contrast", severity, seed=0), expected)


def test_corrupt_clips_to_the_uint8_range_and_rounds():
    x = torch.tensor([[[[0, 255, 3, 252]]]], dtype=torch.uint8).repeat(1, 1, 4, 1)
    y = robustness.corrupt(x, "gaussian_noise", 5, seed=1)
    gen = torch.Generator().manual_seed(robustness.noise_seed(1, "gaussian_noise", 5))
    raw = (x.float() / 255 + 0.38 * torch.randn(x.shape, generator=gen)) * 255
    assert torch.equal(y, raw.clamp(0, 255).round().to(torch.uint8))
    assert y.dtype == torch.uint8 and y.min() == 0 and y.max() == 255


def test_corrupt_blurs_in_the_unit_range():
    x = images(size=16)
    expected = to_uint8(robustness.gaussian_blur(x.float() / 255, 4))
    assert torch.equal(robustness.corrupt(x, "gaussian_blur", 4, seed=3), expected)


def test_corrupt_of_more_than_a_chunk_draws_the_noise_in_chunks_of_1024():
    x = images(n=1030, channels=1, size=2)
    gen = torch.Generator().manual_seed(robustness.noise_seed(0, "gaussian_noise", 2))
    parts = [to_uint8(c.float() / 255 + 0.12 * torch.randn(c.shape, generator=gen)) for c in x.split(1024)]
    assert torch.equal(robustness.corrupt(x, "gaussian_noise", 2, seed=0), torch.cat(parts))


def test_no_images_give_no_images():
    x = torch.zeros(0, 1, 8, 8, dtype=torch.uint8)
    y = robustness.corrupt(x, "contrast", 1, seed=0)
    assert y.shape == (0, 1, 8, 8) and y.dtype == torch.uint8


@pytest.mark.parametrize("severity", [0, 6, -1])
def test_severity_outside_1_to_5_is_refused(severity):
    with pytest.raises(ValueError, match=rf"severity must be 1\.\.5, got {severity}$"):
        robustness.corrupt(images(), "contrast", severity, seed=0)


def test_unknown_corruption_names_the_known_ones():
    with pytest.raises(ValueError, match=r"^unknown corruption 'fog'; known: gaussian_noise, gaussian_blur, contrast$"):
        robustness.corrupt(images(), "fog", 1, seed=0)
    for severity in (1, 5):
        robustness.corrupt(images(), "contrast", severity, seed=0)       # the bounds themselves are valid


def test_plot_draws_top1_percent_per_severity_and_the_clean_line(monkeypatch, tmp_path):
    import pipeline.plots

    saved = []
    monkeypatch.setattr(pipeline.plots, "save_png", lambda fig, path: saved.append((fig, path)))
    table = {"gaussian_noise": {"3": 0.5, "1": 0.75}, "contrast": {"1": 0.6, "3": 0.25, "5": 0.125}}
    robustness.plot(0.875, table, tmp_path / "r.png", "the title")
    (fig, path), = saved
    assert path == tmp_path / "r.png"
    ax, = fig.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["gaussian_noise", "contrast", "clean: 87.5%"]
    assert list(lines[0].get_xdata()) == [1, 3] and list(lines[0].get_ydata()) == [75.0, 50.0]
    assert list(lines[1].get_xdata()) == [1, 3, 5] and list(lines[1].get_ydata()) == [60.0, 25.0, 12.5]
    assert list(lines[2].get_ydata()) == [87.5, 87.5] and lines[2].get_linestyle() == "--"
    assert list(ax.get_xticks()) == [1, 3, 5]
    assert ax.get_xlabel() == "severity (ImageNet-C levels)" and ax.get_ylabel() == "top-1 accuracy (%)"
    assert ax.get_title() == "the title"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["gaussian_noise", "contrast", "clean: 87.5%"]


def test_plot_writes_a_png(tmp_path):
    robustness.plot(0.5, {"contrast": {"1": 0.25}}, tmp_path / "r.png", "t")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
