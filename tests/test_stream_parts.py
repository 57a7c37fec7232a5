"""pipeline.data.stream's parts, against their docstrings: the Pillow path of read_image (what is not a JPEG: PNG,
16-bit, palette, EXIF-rotated) converted as the tensor format converts, and channel_stats' fixed seeded sample of
distinct train images, with its progress bar. Tiny PNG folders, no workers."""
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import stream
from pipeline.data.datasets import tensor_channel_stats
from pipeline.settings import Stream


def read(path, mode):
    return stream.read_image(str(path), path.stat().st_size, mode)


def test_a_png_is_read_by_pillow_in_the_mode_asked(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [10, 20, 30]]], dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    x = read(tmp_path / "rgb.png", "RGB")
    assert x.dtype == torch.uint8 and x.shape == (3, 1, 3) and x.permute(1, 2, 0).tolist() == rgb.tolist()
    g = read(tmp_path / "rgb.png", "L")
    assert g.shape == (1, 1, 3) and g[0].tolist() == np.asarray(Image.fromarray(rgb).convert("L")).tolist()


def test_pillow_images_are_converted_as_the_tensor_format_converts(tmp_path):
    Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    assert read(tmp_path / "deep.png", "L").tolist() == [[[0, 1, 255]]]             # 16-bit grey / 257
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 0, 0, 255])
    p.putdata([1, 0])
    p.save(tmp_path / "pal.png")
    assert read(tmp_path / "pal.png", "RGB")[:, 0, 0].tolist() == [0, 0, 255]       # its colour, not index 1


def test_an_exif_rotated_image_is_read_upright(tmp_path):
    a = np.zeros((2, 3), dtype=np.uint8)
    a[0, 0] = 200                                      # stored 3 wide, 2 high, bright top-left
    exif = Image.Exif()
    exif[0x0112] = 6                                   # orientation 6: rotate 90 degrees clockwise to view
    Image.fromarray(a).save(tmp_path / "rot.png", exif=exif)
    x = read(tmp_path / "rot.png", "L")
    assert x.shape == (1, 3, 2) and x[0].tolist() == [[0, 200], [0, 0], [0, 0]]


def constant_folder(root, n_per_class=4, classes=2):
    """PNGs at 16 px, each one grey value (distinct), so the eval transform keeps it and its stats are known."""
    v = 0
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n_per_class):
            Image.new("L", (16, 16), 10 + 20 * v).save(root / f"c{c}" / f"{i}.png")
            v += 1
    return root


DATA = {"dataset": "imagefolder", "img_size": 16, "channels": 1, "val_fraction": 0.25, "format": "stream"}


def test_channel_stats_count_each_train_image_once(tmp_path, capsys):
    d = dict(DATA, path=str(constant_folder(tmp_path / "im")))
    man = stream.scan(d, 0)
    images = Stream.folder(d)
    everything = stream.split_images(man, "train", images).tensor()
    assert len(everything) == 6 and len({int(v) for v in everything[:, 0, 0, 0]}) == 6
    mean, std = stream.channel_stats(man, images, 0)
    all_mean, all_std = tensor_channel_stats(everything)
    assert np.allclose(mean, all_mean) and np.allclose(std, all_std)
    assert "\rprepare_data channel stats: " in capsys.readouterr().err         # its progress bar, named


def test_channel_stats_sample_is_a_fixed_seeded_choice(tmp_path, monkeypatch):
    d = dict(DATA, path=str(constant_folder(tmp_path / "im", n_per_class=8)))
    man = stream.scan(d, 0)
    images = Stream.folder(d)
    monkeypatch.setattr(stream, "STATS_IMAGES", 3)
    everything = stream.split_images(man, "train", images).tensor()
    pick = np.sort(np.random.default_rng(5).choice(len(everything), 3, replace=False))
    mean, std = stream.channel_stats(man, images, 5)
    want_mean, want_std = tensor_channel_stats(everything[torch.from_numpy(pick)])
    assert mean == pytest.approx(want_mean) and std == pytest.approx(want_std)    # the sampled images
    assert stream.channel_stats(man, images, 5) == (mean, std)
