"""pipeline.data.folders' parts, each against its docstring: the mode conversion every image reader shares
(convert_pil_mode), the file-backed image tensor (mapped_empty, read_images), the resize and centre crop
(_center_crop) and the words for the skipped files (skipped_note). Tiny images, no dataset."""
import os
import re
import tempfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import folders
from pipeline.errors import PipelineError


def grey(im) -> list:
    return np.asarray(folders.convert_pil_mode(im, "L")).tolist()


# ---- convert_pil_mode: 16-bit and float grey scaled, palettes, alpha ---------------------------------------

def test_16_bit_grey_is_scaled_to_8_bits_whatever_its_range():
    im = Image.fromarray(np.array([[0, 255, 257, 32896, 65535]], dtype=np.uint16))
    assert im.mode.startswith("I;16")
    assert grey(im) == [[0, 1, 1, 128, 255]]           # v / 257, rounded: 65535 -> 255, 255 -> 1 (not 255)
    big_endian = Image.frombytes("I;16B", (3, 1), np.array([0, 257, 65535], dtype=">u2").tobytes())
    assert big_endian.mode == "I;16B" and grey(big_endian) == [[0, 1, 255]]
    dark = Image.fromarray(np.array([[0, 128, 129, 255]], dtype=np.uint16))   # 16-bit even when all of it is < 256
    assert dark.mode == "I;16" and grey(dark) == [[0, 0, 1, 1]]


def test_32_bit_grey_is_kept_when_it_fits_8_bits_and_scaled_when_it_does_not():
    fits = Image.fromarray(np.array([[-5, 0, 1, 200, 255]], dtype=np.int32))
    assert fits.mode == "I"
    assert grey(fits) == [[0, 0, 1, 200, 255]]         # values of 0..255 kept; below 0 clipped
    over = Image.fromarray(np.array([[0, 256, 514]], dtype=np.int32))
    assert grey(over) == [[0, 1, 2]]                   # a maximum over 255: 16-bit, / 257
    just_over = Image.fromarray(np.array([[0, 128, 256]], dtype=np.int32))
    assert grey(just_over) == [[0, 0, 1]]              # even 256
    huge = Image.fromarray(np.array([[0, 257 * 100, 257 * 389]], dtype=np.int32))
    assert grey(huge) == [[0, 100, 255]]               # beyond 16 bits: clipped at 255, not wrapped


def test_float_grey_is_rounded_and_scaled_like_integer_grey():
    f = Image.fromarray(np.array([[0.0, 1.4, 1.6, 200.0, 255.0]], dtype=np.float32))
    assert f.mode == "F"
    assert grey(f) == [[0, 1, 2, 200, 255]]
    over = Image.fromarray(np.array([[0.0, 514.0, 65535.0]], dtype=np.float32))
    assert grey(over) == [[0, 2, 255]]
    rgb = np.asarray(folders.convert_pil_mode(over, "RGB"))
    assert rgb.shape == (1, 3, 3) and rgb[..., 0].tolist() == rgb[..., 2].tolist() == [[0, 2, 255]]


def test_8_bit_modes_convert_as_pillow_does():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [10, 20, 30]]], dtype=np.uint8)
    im = Image.fromarray(rgb)
    assert np.array_equal(np.asarray(folders.convert_pil_mode(im, "RGB")), rgb)
    assert grey(im) == np.asarray(im.convert("L")).tolist()
    white = Image.new("1", (3, 1), 1)
    assert grey(white) == [[255, 255, 255]]              # a bilevel white is 255, not 1
    assert np.asarray(folders.convert_pil_mode(white, "RGB")).tolist() == [[[255] * 3] * 3]
    rgba = Image.fromarray(np.array([[[200, 100, 50, 0]]], dtype=np.uint8))
    assert np.asarray(folders.convert_pil_mode(rgba, "RGB")).tolist() == [[[200, 100, 50]]]   # alpha dropped
    la = Image.fromarray(np.array([[[90, 0], [40, 255]]], dtype=np.uint8), "LA")
    assert grey(la) == [[90, 40]]


def palette_image():
    p = Image.new("P", (4, 1))
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    p.putdata([0, 1, 2, 1])
    return p


def test_a_palette_image_gives_its_palette_colours_not_its_indices():
    p = palette_image()
    assert np.asarray(folders.convert_pil_mode(p, "RGB")).tolist() == [[[0, 0, 0], [255, 0, 0], [0, 255, 0],
                                                                        [255, 0, 0]]]
    assert grey(p) == np.asarray(p.convert("RGB").convert("L")).tolist()


def test_palette_transparency_goes_through_rgba_without_pillows_warning():
    p = palette_image()
    p.info["transparency"] = bytes([0, 255, 128])      # per-entry alpha: Pillow warns converting it to RGB or L
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = folders.convert_pil_mode(p, "RGB")
        out_l = folders.convert_pil_mode(p, "L")
    assert out.mode == "RGB" and out_l.mode == "L"
    assert np.asarray(out).tolist() == [[[0, 0, 0], [255, 0, 0], [0, 255, 0], [255, 0, 0]]]   # colours kept
    assert grey(palette_image()) == np.asarray(out_l).tolist()


# ---- mapped_empty and read_images: a tensor mapped from a reserved file in scratch ---------------------------

on_linux = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")


def backing_file(t: torch.Tensor) -> tuple[str, int]:
    """The file the tensor's memory is mapped from (its /proc/self/maps name) and that file's size."""
    ptr = t.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= ptr < end:
            name = fields[5].strip() if len(fields) > 5 else ""
            break
    else:
        raise AssertionError("no mapping holds the tensor")
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == name:
                return name, os.stat(f"/proc/self/fd/{fd}").st_size
        except OSError:
            pass
    return name, -1


@on_linux
def test_mapped_empty_is_uint8_mapped_from_an_unnamed_file_of_its_size_in_scratch(tmp_path):
    scratch = tmp_path / "a" / "b"                   # missing parents are made
    t = folders.mapped_empty((2, 3, 5, 7), scratch)
    assert t.shape == (2, 3, 5, 7) and t.dtype == torch.uint8
    name, size = backing_file(t)
    assert name.startswith(f"{scratch}/") and name.endswith("(deleted)")   # O_TMPFILE: never linked
    assert size == 2 * 3 * 5 * 7                      # exactly the tensor's bytes reserved
    assert list(scratch.iterdir()) == []
    t[:] = 9
    again = folders.mapped_empty((4,), scratch)      # an existing scratch folder is fine
    assert again.shape == (4,) and backing_file(again)[0].startswith(f"{scratch}/")


@on_linux
def test_mapped_empty_without_scratch_uses_the_system_temp_folder():
    t = folders.mapped_empty((3, 4), None)
    assert t.shape == (3, 4) and t.dtype == torch.uint8
    assert backing_file(t)[0].startswith(f"{tempfile.gettempdir()}/")


def test_mapped_empty_of_no_bytes_is_an_empty_uint8_tensor(tmp_path):
    for shape in [(0, 3, 4, 4), (2, 0)]:
        t = folders.mapped_empty(shape, tmp_path / "s")
        assert t.shape == shape and t.dtype == torch.uint8 and t.numel() == 0


def test_a_scratch_under_a_file_is_one_error_naming_it(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(PipelineError, match=r"cannot make a 0 MB temporary image file in .*/f/s: "):
        folders.mapped_empty((2, 2), tmp_path / "f" / "s")


def test_a_failed_reservation_names_the_size_and_the_folder(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(PipelineError) as e:
        folders.mapped_empty((4, 1024, 1024), tmp_path)
    assert str(e.value) == f"cannot make a 4 MB temporary image file in {tmp_path}: [Errno 28] No space left on device"
    with pytest.raises(PipelineError) as e:
        folders.mapped_empty((3, 2 ** 20), None)
    assert str(e.value).startswith(f"cannot make a 3 MB temporary image file in {tempfile.gettempdir()}: ")


@on_linux
def test_read_images_fills_the_scratch_mapped_tensor_in_the_channels_asked(tmp_path):
    red = tmp_path / "red.png"
    Image.new("RGB", (6, 4), (255, 0, 0)).save(red)
    blue = tmp_path / "blue.png"
    Image.new("RGB", (4, 4), (0, 0, 255)).save(blue)
    x, y = folders.read_images({"r": [red], "b": [blue, red]}, {"img_size": 4, "channels": 3}, tmp_path / "s")
    assert x.shape == (3, 3, 4, 4) and y.tolist() == [0, 1, 1]
    assert x[0, :, 0, 0].tolist() == [255, 0, 0] and x[1, :, 0, 0].tolist() == [0, 0, 255]
    assert backing_file(x)[0].startswith(f"{tmp_path / 's'}/")
    g, _ = folders.read_images({"r": [red]}, {"img_size": 4, "channels": 1}, None)
    assert g.shape == (1, 1, 4, 4) and g[0, 0, 0, 0] == 76              # L of pure red
    (tmp_path / "f").write_text("x")
    with pytest.raises(PipelineError, match="temporary image file in .*/f/s"):
        folders.read_images({"r": [red]}, {"img_size": 4, "channels": 3}, tmp_path / "f" / "s")


# ---- _center_crop: shorter side to `short` (bicubic), centre crop as the streamed eval transform ----------

def columns(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.tile(np.arange(w, dtype=np.uint8) * 10, (h, 1)))


def test_an_image_whose_shorter_side_fits_is_only_cropped_at_the_centre():
    wide = folders._center_crop(columns(11, 8), 8, 8)        # excess 3: left = 3 // 2 = 1
    assert wide.size == (8, 8) and np.asarray(wide)[0].tolist() == [10 * c for c in range(1, 9)]
    tall = folders._center_crop(columns(11, 8).transpose(Image.Transpose.TRANSPOSE), 8, 8)
    assert np.asarray(tall)[:, 0].tolist() == [10 * r for r in range(1, 9)]
    tall16 = folders._center_crop(columns(16, 8).transpose(Image.Transpose.TRANSPOSE), 8, 8)
    assert np.asarray(tall16)[:, 0].tolist() == [10 * r for r in range(4, 12)]     # top = 8 // 2
    same = columns(8, 8)
    assert np.array_equal(np.asarray(folders._center_crop(same, 8, 8)), np.asarray(same))


def test_an_odd_excess_leaves_the_extra_pixel_right_and_below_as_the_streamed_eval_transform():
    # (n - size) // 2, the box pipeline.data.stream.eval_transform cuts: both formats crop alike
    wide = folders._center_crop(columns(19, 8), 8, 8)        # excess 11: left 5
    assert np.asarray(wide)[0].tolist() == [10 * c for c in range(5, 13)]
    tall = folders._center_crop(columns(19, 8).transpose(Image.Transpose.TRANSPOSE), 8, 8)
    assert np.asarray(tall)[:, 0].tolist() == [10 * r for r in range(5, 13)]


def test_the_shorter_side_is_resized_to_short_keeping_the_aspect():
    halves = np.zeros((16, 32), dtype=np.uint8)
    halves[:, 16:] = 200
    out = np.asarray(folders._center_crop(Image.fromarray(halves), 8, 8))   # -> 16 x 8, columns 4..11
    assert out.shape == (8, 8)
    assert (out[:, :3] <= 5).all() and (out[:, 5:] >= 195).all()           # left half dark, right half light
    tall = np.asarray(folders._center_crop(Image.fromarray(halves.T.copy()), 8, 8))
    assert (tall[:3] <= 5).all() and (tall[5:] >= 195).all()
    ramp = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (12, 1))          # 24 x 12 -> 8 x 4 ... crop 4
    out = np.asarray(folders._center_crop(Image.fromarray(ramp), 4, 4))
    expect = np.asarray(Image.fromarray(ramp).resize((8, 4), Image.Resampling.BICUBIC))[:, 2:6]
    assert np.array_equal(out, expect)
    up = np.asarray(folders._center_crop(Image.fromarray(np.full((2, 3), 77, np.uint8)), 4, 4))
    assert up.shape == (4, 4) and (up == 77).all()                          # a small image is enlarged


# ---- skipped_note ----------------------------------------------------------------------------------------

def test_skipped_note_orders_kinds_by_count_then_name():
    assert folders.skipped_note({".a": 1, ".b": 2}) == "3 non-image files skipped (.b 2, .a 1)"
    assert folders.skipped_note({".z": 1, ".a": 1}) == "2 non-image files skipped (.a 1, .z 1)"
    assert folders.skipped_note({}) == "0 non-image files skipped"


# ---- split_folder, image_files, _split_files: which files are train and val ----------------------------------

def make_tree(root, files) -> None:
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_train_and_val_folders_are_the_split_and_every_folders_non_images_are_counted(tmp_path):
    make_tree(tmp_path, ["train/a/1.png", "train/a/notes.txt", "train/b/2.jpg", "val/a/3.png", "val/b/4.png",
                         "val/b/README", "val/b/x.txt"])
    skipped = {}
    train, val = folders.split_folder(tmp_path, 0.5, 0, skipped)
    assert {c: [f.name for f in fs] for c, fs in train.items()} == {"a": ["1.png"], "b": ["2.jpg"]}
    assert {c: [f.name for f in fs] for c, fs in val.items()} == {"a": ["3.png"], "b": ["4.png"]}
    assert skipped == {".txt": 2, "no extension": 1}
    assert folders.split_folder(tmp_path, 0.5, 0)[0].keys() == {"a", "b"}      # no skipped dict: one of its own


@pytest.mark.parametrize("only", ["train", "val"])
def test_only_one_of_train_and_val_is_an_error(tmp_path, only):
    make_tree(tmp_path, [f"{only}/a/1.png", "c/2.png"])
    root = re.escape(str(tmp_path))
    with pytest.raises(PipelineError, match=rf"^{root} has only one of train/ and val/; give both or neither$"):
        folders.split_folder(tmp_path, 0.5, 0)


def test_train_and_val_with_other_classes_name_the_differing_ones(tmp_path):
    make_tree(tmp_path, ["train/a/1.png", *[f"train/t{i}/1.png" for i in range(4)], "val/a/1.png",
                         *[f"val/v{i}/1.png" for i in range(4)]])
    with pytest.raises(PipelineError) as err:
        folders.split_folder(tmp_path, 0.5, 0)
    assert str(err.value) == f"{tmp_path}: train/ and val/ have different class folders (e.g. t0, t1, t2, t3, v0)"


def test_class_folders_are_the_visible_folders_and_their_visible_image_files(tmp_path):
    make_tree(tmp_path, ["b/2.png", "b/.hidden.png", "a/1.png", ".git/x.png", "top.png"])
    skipped = {}
    found = folders.image_files(tmp_path, skipped)
    assert {c: [f.name for f in fs] for c, fs in found.items()} == {"a": ["1.png"], "b": ["2.png"]}
    assert list(found) == ["a", "b"] and skipped == {}


def test_a_folder_without_class_folders_or_with_an_empty_one_is_a_one_line_error(tmp_path):
    make_tree(tmp_path, ["top.png"])
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(tmp_path))} holds no class folders$"):
        folders.image_files(tmp_path, {})
    make_tree(tmp_path, ["a/1.png", "b/x.txt", "b/y.txt"])
    b = re.escape(str(tmp_path / "b"))
    with pytest.raises(PipelineError, match=rf"^empty class folder: {b} \(2 non-image files\)$"):
        folders.image_files(tmp_path, {})
    (tmp_path / "b" / "x.txt").unlink(), (tmp_path / "b" / "y.txt").unlink()
    with pytest.raises(PipelineError, match=rf"^empty class folder: {b}$"):
        folders.image_files(tmp_path, {})


def test_a_split_keeps_at_least_one_file_of_each_class_in_train():
    files = {"a": ["1", "2", "3"], "b": ["4"]}
    train, val = folders._split_files(files, 1.0, 0)
    assert {c: len(f) for c, f in train.items()} == {"a": 1, "b": 1}
    assert {c: len(f) for c, f in val.items()} == {"a": 2, "b": 0}
    train, val = folders._split_files(files, 0.5, 0)
    assert sorted(train["a"] + val["a"]) == ["1", "2", "3"] and len(val["a"]) == 2    # round(1.5) = 2 (+0.5, floor)
