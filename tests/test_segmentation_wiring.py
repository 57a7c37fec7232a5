"""How pipeline/evaluation/segmentation.py wires its parts together, by the module's documented contracts: make_canvases
takes an index of image indices of any integer dtype (not only int64); digit_canvas passes its whole-quadrant
decision and its threshold on to make_canvases, and decides "no dark background" from the median grey of exactly
the first 1024 train images (a 1025th image that would tip the median is not read); patch_tokens computes in the
precision asked (fp32 when none is), in batches of at most 256 images, and returns the patch tokens without the
class token."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.datasets import Prepared
from pipeline.evaluation import segmentation as seg

pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py: torch on one thread


def prepared(train_x, val_x, classes=10):
    """A Prepared set of the images given, labels i % classes."""
    c = train_x.shape[1]
    return Prepared(train_x, torch.arange(len(train_x)) % classes, val_x, torch.arange(len(val_x)) % classes,
                    [f"c{i}" for i in range(classes)], [0.2] * c, [0.3] * c, "src")


# ---- digit canvases ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint8])
def test_canvas_index_of_any_integer_dtype_selects_the_same_images(dtype):
    images = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    for i in range(4):
        images[i, :, : i + 1] = 100 + 40 * i          # a different picture per image
    labels = torch.tensor([3, 5, 7, 1])
    index = np.array([[2, 0, 3, 1], [1, 1, 0, 2]])
    want = seg.make_canvases(images, labels, index.astype(np.int64))
    got = seg.make_canvases(images, labels, index.astype(dtype))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bright_rgb_sets_label_dark_pixels_of_a_quadrant_too():
    """No dark background (median grey above the threshold): each quadrant is labelled whole with 1 + its class,
    its dark pixels included, not thresholded."""
    def split(n):
        x = torch.full((n, 3, 8, 8), 200, dtype=torch.uint8)
        x[:, :, :4, :4] = 0                            # a dark corner per image (a quarter): the median stays 200
        return x
    ds = seg.digit_canvas(prepared(split(8), split(8)), 0)
    assert ds.info["threshold"] is None
    assert int(seg.grey(ds.train_x).min()) <= seg.FOREGROUND_THRESHOLD   # the dark corners survive the resize
    for m in (ds.train_m, ds.val_m):
        assert int(m.min()) >= 1                       # no background anywhere, the dark pixels included


def test_the_threshold_given_decides_the_foreground():
    """digit_canvas(..., threshold=t): a pixel belongs to its digit where grey > t, so grey 80 is background at
    t = 100 (and foreground at the default 64)."""
    def split(n):
        x = torch.zeros((n, 1, 4, 4), dtype=torch.uint8)
        x[:, :, :2] = 80                               # top half grey 80, bottom half black
        return x
    prep = prepared(split(8), split(8))
    high = seg.digit_canvas(prep, 0, threshold=100)
    assert int(high.train_m.max()) == 0 and int(high.val_m.max()) == 0
    default = seg.digit_canvas(prep, 0)
    assert int(default.train_m.max()) >= 1


def test_the_median_reads_no_train_image_past_the_1024th():
    """The whole-quadrant test takes the median grey of the first 1024 train images only: there it is dark (2047
    bright pixels of 4096), so the set is thresholded, although with the 1025th (bright) image the median would be
    bright (2051 of 4100, whichever middle value a median picks)."""
    x = torch.zeros((1100, 3, 2, 2), dtype=torch.uint8)
    x[:511] = 200                                      # 511 bright images: 2044 pixels
    x[511].view(3, 4)[:, :3] = 200                     # + 3 pixels of the 512th: 2047 of 4096
    x[1024] = 200                                      # the 1025th is bright
    assert seg.digit_canvas(prepared(x, x[:4]), 0).info["threshold"] == seg.FOREGROUND_THRESHOLD


# ---- patch tokens --------------------------------------------------------------------------------------

class TinyViT(nn.Module):
    """(B, 1, 4, 4) -> (B, 1 + 4, 3): a class token then one token per 2x2 patch; records each batch's size and
    the dtype its linear layer computed in."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.cls = nn.Parameter(torch.full((1, 1, 3), 7.0))
        self.seen = []

    def forward(self, x):
        tokens = self.proj(F.unfold(x, 2, stride=2).transpose(1, 2))
        self.seen.append((len(x), tokens.dtype))
        return torch.cat([self.cls.expand(len(x), 1, 3).to(tokens.dtype), tokens], 1)


def images(n, seed=0):
    return torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def expected_tokens(encoder, x, mean=0.2, std=0.3):
    with torch.no_grad():
        return encoder.proj(F.unfold((x.float() / 255 - mean) / std, 2, stride=2).transpose(1, 2))


def test_patch_tokens_default_to_fp32_and_drop_the_class_token():
    enc, x = TinyViT(), images(5)
    got = seg.patch_tokens(enc, x, [0.2], [0.3])                       # no precision given: fp32
    assert [dtype for _, dtype in enc.seen] == [torch.float32]
    assert got.dtype == torch.float32 and got.shape == (5, 4, 3)
    torch.testing.assert_close(got, expected_tokens(enc, x))


def test_patch_tokens_compute_in_the_precision_asked():
    enc, x = TinyViT(), images(5)
    got = seg.patch_tokens(enc, x, [0.2], [0.3], "bf16")
    assert [dtype for _, dtype in enc.seen] == [torch.bfloat16]       # the encoder ran under bf16 autocast
    assert got.dtype == torch.float32 and got.shape == (5, 4, 3)     # returned as float32
    torch.testing.assert_close(got, expected_tokens(enc, x), atol=0.1, rtol=0.05)


def test_patch_tokens_run_in_batches_of_at_most_256_images():
    """Each image yields L tokens (not one pooled feature): the tokens are computed 256 images at a time, in
    order."""
    enc, x = TinyViT(), images(257)
    got = seg.patch_tokens(enc, x, [0.2], [0.3], "fp32")
    assert [n for n, _ in enc.seen] == [256, 1]
    torch.testing.assert_close(got, expected_tokens(enc, x))


def test_grey_of_one_channel_is_the_channel_itself():
    """grey: a one-channel image's grey values are its own (luma weighting them would move 35 of the 256 values
    by float rounding); three channels are weighted by LUMA."""
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(seg.grey(x), x[:, 0].float())
    rgb = torch.stack([x[:, 0], torch.zeros_like(x[:, 0]), 255 - x[:, 0]], 1)
    torch.testing.assert_close(seg.grey(rgb), seg.LUMA[0] * x[:, 0].float() + seg.LUMA[2] * (255 - x[:, 0].float()))


def test_examples_figure_shows_grey_pixels_on_the_full_0_255_scale():
    """A grey canvas is drawn as its pixel values on 0..255 (vmin 0, vmax 255), not stretched to its own range:
    a uniformly light canvas stays light."""
    light = torch.full((1, 1, 4, 4), 200, dtype=torch.uint8)
    masks = torch.zeros(1, 4, 4, dtype=torch.uint8)
    im = seg.examples_figure(light, masks, masks, ["bg", "a"]).axes[0].get_images()[0]
    assert im.get_clim() == (0, 255) and im.get_cmap().name == "gray"
    assert np.array_equal(np.asarray(im.get_array()), light[0, 0].numpy())


def test_a_sharp_digit_is_resized_into_its_quadrant_clamped_not_wrapped():
    """Bicubic resizing overshoots at a 0|255 edge (about -3 and 258 from 8 to 4 px): the canvas holds those pixels
    clamped to 0..255, so the edge stays a monotone ramp from black to white (no 253 on the black side, no 2 or 0 on
    the white side, as uint8 wrap-around would give)."""
    digit = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    digit[..., 4:] = 255                                              # left half black, right half white
    canvases, _ = seg.make_canvases(digit, torch.zeros(1, dtype=torch.long), np.zeros((1, 4), dtype=int))
    for quadrant in (canvases[0, 0, :4, :4], canvases[0, 0, 4:, 4:]):
        for row in quadrant.int():
            assert row[0] == 0 and row[-1] == 255 and bool((row.diff() >= 0).all()), row


def test_the_legend_shows_each_class_in_its_mask_colour():
    images = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    masks = torch.zeros(1, 4, 4, dtype=torch.uint8)
    names = ["bg", "a", "b"]
    legend, = seg.examples_figure(images, masks, masks, names).legends
    from matplotlib.colors import to_rgb

    assert [to_rgb(h.get_facecolor()) for h in legend.legend_handles] == \
        [to_rgb(c) for c in seg.class_colours(len(names))[:len(names)]]
