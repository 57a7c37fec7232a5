"""pipeline.data.stream's transforms against their docstrings: crop_box is torchvision's
RandomResizedCrop.get_params with its draws taken from the numpy generator given (the reference below is that
function, transcribed), train_transform is that crop resized then a horizontal flip with probability 1/2, eval_transform
resizes the shorter side and crops the centre, and _resize is bicubic with antialiasing (Pillow's pixels)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import stream


def get_params(w, h, scale, rng):
    """torchvision.transforms.RandomResizedCrop.get_params (ratio 3/4..4/3), torch's draws replaced by rng's:
    (left, top, width, height)."""
    area, log_ratio = w * h, (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            i = int(rng.integers(0, h - ch + 1))
            j = int(rng.integers(0, w - cw + 1))
            return j, i, cw, ch
    in_ratio = w / h
    if in_ratio < 3 / 4:
        cw, ch = w, round(w / (3 / 4))
    elif in_ratio > 4 / 3:
        ch, cw = h, round(h * (4 / 3))
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


SIZES = [(1, 1), (2, 2), (1, 3), (3, 1), (2, 5), (10, 8), (8, 10), (30, 10), (10, 30), (16, 9), (40, 41), (7, 20)]
SCALES = [(0.01, 0.1), (0.08, 1.0), (0.2, 1.0), (0.5, 0.9), (1.0, 1.0)]


def test_crop_box_is_torchvisions_get_params_drawn_from_the_generator():
    fallbacks = 0
    for w, h in SIZES:
        for scale in SCALES:
            for seed in range(40):
                got = stream.crop_box(w, h, scale, np.random.default_rng(seed))
                assert got == get_params(w, h, scale, np.random.default_rng(seed)), (w, h, scale, seed)
                assert all(type(v) is int for v in got)            # slice bounds
                left, top, cw, ch = got
                assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h
                fallbacks += (cw, ch) in [(w, h), (w, round(w / 0.75)), (round(h * 4 / 3), h)]
    assert fallbacks > 0


def test_the_fallback_is_a_centred_crop_of_the_clamped_ratio():
    rng = np.random.default_rng(0)
    assert stream.crop_box(30, 10, (1.0, 1.0), rng) == (8, 0, 13, 10)        # 30 x 10: width 13 (4:3), centred
    assert stream.crop_box(10, 30, (1.0, 1.0), rng) == (0, 8, 10, 13)        # 10 x 30: height 13 (3:4), centred


def image(h, w, c=3):
    return torch.arange(c * h * w, dtype=torch.int64).remainder(251).to(torch.uint8).view(c, h, w)


@pytest.mark.parametrize("hflip", [True, False])
def test_train_transform_is_the_crop_resized_then_a_coin_flip_mirror(hflip):
    flips = 0
    for hw in [(12, 20), (20, 12)]:
        x = image(*hw)
        for seed in range(12):
            got = stream.train_transform(x, 8, (0.2, 1.0), hflip, np.random.default_rng(seed))
            rng = np.random.default_rng(seed)
            left, top, cw, ch = stream.crop_box(hw[1], hw[0], (0.2, 1.0), rng)
            want = stream._resize(x[:, top:top + ch, left:left + cw], 8, 8)
            flip = rng.random() < 0.5
            flips += flip
            assert got.is_contiguous() and torch.equal(got, want.flip(-1) if hflip and flip else want)
    assert 0 < flips < 24


def test_eval_transform_resizes_the_shorter_side_and_crops_the_centre():
    cols = torch.arange(16, dtype=torch.uint8).mul(10).view(1, 1, 16).expand(1, 8, 16).contiguous()
    out = stream.eval_transform(cols, 7)            # shorter side 8 = round(7 / 0.875): no resize, 16 x 8 kept
    assert out.shape == (1, 7, 7) and out[0, 0].tolist() == [10 * c for c in range(4, 11)]   # left (16-7)//2
    rows = cols.transpose(1, 2).contiguous()
    assert stream.eval_transform(rows, 7)[0, :, 0].tolist() == [10 * r for r in range(4, 11)]
    tall = torch.arange(11, dtype=torch.uint8).mul(10).view(1, 11, 1).expand(1, 11, 8).contiguous()
    assert stream.eval_transform(tall, 7)[0, :, 0].tolist() == [10 * r for r in range(2, 9)]   # top (11-7)//2
    wide = tall.transpose(1, 2).contiguous()
    assert stream.eval_transform(wide, 7)[0, 0].tolist() == [10 * c for c in range(2, 9)]
    big = image(24, 48, 1)
    out = stream.eval_transform(big, 7)             # 48 x 24 -> 16 x 8, centre 7 x 7
    assert torch.equal(out, stream._resize(big, 8, 16)[:, 0:7, 4:11])


def test_resize_is_pillows_bicubic_with_antialiasing():
    a = np.random.default_rng(0).integers(0, 256, (24, 32), dtype=np.uint8)
    x = torch.from_numpy(a)[None]
    for h, w in [(12, 16), (7, 9), (36, 48)]:
        pil = np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BICUBIC)).astype(np.float32)
        ours = stream._resize(x, h, w)
        assert ours.dtype == torch.uint8 and ours.shape == (1, h, w)
        assert np.abs(ours[0].numpy().astype(np.float32) - pil).mean() < 0.5
    assert stream._resize(x, 24, 32) is x


def test_the_step_sampler_has_a_batch_per_step_from_start_to_total():
    steps = stream._Steps(np.arange(10), 4, 0, slice(None), 2, 5, lambda n, bs, seed, step: np.arange(bs))
    assert len(steps) == 3 and len(list(steps)) == 3
