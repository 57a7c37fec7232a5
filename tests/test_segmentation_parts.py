"""The dense probe's parts (pipeline/evaluation/segmentation.py) by the module's documented contracts: the canvases'
draws (consecutive permutations from numpy's default_rng([split_seed, 0 train | 1 val]), max(N // 4, 8) canvases),
the bicubic-antialias resize into S // 2 and S - S // 2 quadrants, the grey/luma threshold (strictly above 64),
the whole-quadrant labelling of bright RGB sets, the dataset record; the image/mask folders (file selection, the
errors naming the problem, the shorter-side resize and centre crop, the seeded split with val_fraction rounded,
classes from the masks); the head (BatchNorm without affine, eps 1e-6, Linear trunc-normal 0.01 / zero bias, the
grid check), mIoU / pixel accuracy, the per-pixel argmax predictions, and the training loop (seeded init and
shuffles, AdamW, cosine lr per step, the loss on a lattice whose offset moves one position per epoch, summed
cross-entropy over the valid pixels, history) against an independent loop; the example figure's text."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.datasets import Prepared
from pipeline.errors import PipelineError
from pipeline.evaluation import segmentation as seg

pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py: torch on one thread


# ---- digit canvases ------------------------------------------------------------------------------------

def test_canvas_index_is_consecutive_seeded_permutations():
    got = seg.canvas_index(5, 3, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    perms = np.concatenate([rng.permutation(5) for _ in range(3)])            # 12 draws need 3 permutations
    assert got.shape == (3, 4) and got.tolist() == perms[:12].reshape(3, 4).tolist()
    rng = np.random.default_rng(7)
    assert seg.canvas_index(8, 2, np.random.default_rng(7)).tolist() == rng.permutation(8).reshape(2, 4).tolist()
    rng = np.random.default_rng(1)
    expected = np.concatenate([rng.permutation(3) for _ in range(3)])[:8].reshape(2, 4)
    assert seg.canvas_index(3, 2, np.random.default_rng(1)).tolist() == expected.tolist()


def test_grey_is_the_channel_or_the_luma():
    x = torch.tensor([[[[10, 200]], [[20, 100]], [[30, 0]]]], dtype=torch.uint8)     # (1, 3, 1, 2)
    assert torch.allclose(seg.grey(x), torch.tensor([[[0.299 * 10 + 0.587 * 20 + 0.114 * 30,
                                                        0.299 * 200 + 0.587 * 100]]]))
    one = torch.tensor([[[[7, 250]]]], dtype=torch.uint8)
    assert seg.grey(one).dtype == torch.float32 and seg.grey(one).tolist() == [[[7.0, 250.0]]]


def test_canvases_resize_digits_bicubic_antialias_into_odd_quadrants():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 1, 7, 7), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    x, m = seg.make_canvases(images, labels, np.array([[2, 0, 3, 1]]))
    assert x.shape == (1, 1, 7, 7) and m.shape == (1, 7, 7) and x.dtype == m.dtype == torch.uint8
    boxes = [(0, 3, 0, 3), (0, 3, 3, 7), (3, 7, 0, 3), (3, 7, 3, 7)]          # 7 // 2 = 3, 7 - 3 = 4
    for (r0, r1, c0, c1), i in zip(boxes, (2, 0, 3, 1)):
        ref = F.interpolate(images[i:i + 1].float(), size=(r1 - r0, c1 - c0), mode="bicubic", antialias=True,
                            align_corners=False).round().clamp(0, 255).to(torch.uint8)[0]
        assert torch.equal(x[0, :, r0:r1, c0:c1], ref)
        fg = ref[0].float() > 64
        assert torch.equal(m[0, r0:r1, c0:c1], fg.to(torch.uint8) * (1 + i))


def test_foreground_is_strictly_above_the_threshold_and_labels_are_one_plus_the_class():
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[0] = 64                       # grey exactly 64: background
    images[1] = 65                       # grey 65: foreground
    images[2, 0], images[2, 1], images[2, 2] = 255, 0, 0     # luma 76.2: foreground
    images[3, 2] = 255                   # luma 29.1: background
    x, m = seg.make_canvases(images, torch.tensor([9, 4, 6, 2]), np.array([[0, 1, 2, 3]]))
    assert m[0].tolist() == [[0, 5], [7, 0]]
    _, m = seg.make_canvases(images, torch.tensor([9, 4, 6, 2]), np.array([[0, 1, 2, 3]]), threshold=70)
    assert m[0].tolist() == [[0, 0], [7, 0]]
    _, m = seg.make_canvases(images, torch.tensor([9, 4, 6, 2]), np.array([[0, 1, 2, 3]]), whole_quadrant=True)
    assert m[0].tolist() == [[10, 5], [7, 3]]
    assert torch.equal(x[0, :, 0, 1], images[1, :, 0, 0])


def prepared(n_train, n_val, channels=1, size=8, value=None, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    def split(n):
        if value is not None:
            return torch.full((n, channels, size, size), value, dtype=torch.uint8), torch.arange(n) % classes
        x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
        x[x < 128] = 0
        return x, torch.arange(n) % classes
    (tx, ty), (vx, vy) = split(n_train), split(n_val)
    return Prepared(tx, ty, vx, vy, [f"c{i}" for i in range(classes)], [0.2] * channels, [0.3] * channels, "src")


def test_digit_canvas_draws_each_split_with_its_own_seeded_generator():
    prep = prepared(44, 36)
    ds = seg.digit_canvas(prep, 5)
    for i, (x, y, cx, cm) in enumerate(((prep.train_x, prep.train_y, ds.train_x, ds.train_m),
                                        (prep.val_x, prep.val_y, ds.val_x, ds.val_m))):
        index = seg.canvas_index(len(x), max(len(x) // 4, 8), np.random.default_rng([5, i]))
        ex, em = seg.make_canvases(x, y, index)
        assert torch.equal(cx, ex) and torch.equal(cm, em)
    assert len(ds.train_x) == 11 and len(ds.val_x) == 9


def test_digit_canvas_record():
    prep = prepared(40, 12)
    ds = seg.digit_canvas(prep, 3)
    names = ["background"] + [f"c{i}" for i in range(10)]
    assert ds.class_names == names and ds.num_classes == 11
    assert ds.info == {
        "name": "digit_canvas", "source": "src", "split_seed": 3, "canvas_size": 8, "digit_sizes": [4],
        "digits_per_canvas": 4,
        "splits": {"train": {"canvases": 10, "from_images": 40}, "val": {"canvases": 8, "from_images": 12}},
        "draws": "numpy default_rng([split_seed, 0 train | 1 val]), consecutive permutations of the split",
        "resize": "bicubic, antialias", "min_canvases": 8,
        "labelling": "1 + class where grey > 64, else 0 = background", "threshold": 64,
        "num_classes": 11, "class_names": names}
    odd = seg.digit_canvas(prepared(8, 8, size=7), 0, threshold=100)
    assert odd.info["digit_sizes"] == [3, 4] and odd.info["threshold"] == 100
    assert odd.info["labelling"] == "1 + class where grey > 100, else 0 = background"


def test_bright_rgb_sets_are_labelled_by_whole_quadrants():
    prep = prepared(8, 8, channels=3, value=65)                    # median grey 65 > 64: no dark background
    ds = seg.digit_canvas(prep, 0)
    assert ds.info["threshold"] is None
    assert ds.info["labelling"] == "whole quadrant = 1 + class (no dark background)"
    assert int(ds.train_m.min()) >= 1 and int(ds.val_m.min()) >= 1
    dark = seg.digit_canvas(prepared(8, 8, channels=3, value=64), 0)   # median 64: thresholded (all background)
    assert dark.info["threshold"] == 64 and int(dark.train_m.max()) == 0
    grey = seg.digit_canvas(prepared(8, 8, channels=1, value=200), 0)  # a grey set is always thresholded
    assert grey.info["threshold"] == 64
    assert seg.digit_canvas(prepared(8, 8, channels=3, value=200), 0, threshold=220).info["threshold"] == 220


def test_the_whole_quadrant_test_reads_the_median_of_the_first_1024_train_images():
    prep = prepared(1100, 4, channels=3, size=2, value=200)
    prep.train_x[:1024] = 0                                    # the first 1024 are dark, the rest bright
    assert seg.digit_canvas(prep, 0).info["threshold"] == 64
    prep.train_x[:] = 200
    prep.train_x[1024:] = 0                                    # only images past the first 1024 are dark
    assert seg.digit_canvas(prep, 0).info["threshold"] is None


def test_too_many_classes_for_the_ignore_value():
    prep = prepared(8, 8, classes=254)
    assert seg.digit_canvas(prep, 0).num_classes == 255
    prep = prepared(8, 8, classes=255)
    with pytest.raises(PipelineError, match=r"^digit_canvas needs fewer than 255 classes, the dataset has 255$"):
        seg.digit_canvas(prep, 0)


# ---- image/mask folders --------------------------------------------------------------------------------

def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(root, stems=("a", "b", "c"), size=(6, 4)):
    rng = np.random.default_rng(0)
    for s in stems:
        save(root / "images" / f"{s}.png", rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8))
        save(root / "masks" / f"{s}.png", np.full((size[1], size[0]), len(s) % 3, dtype=np.uint8))
    return root


def test_folder_pairs_selects_images_by_suffix_and_sorts(tmp_path):
    root = make_folder(tmp_path, stems=("b", "a"))
    save(root / "images" / "c.JPG", np.zeros((4, 6, 3), dtype=np.uint8))
    save(root / "masks" / "c.png", np.zeros((4, 6), dtype=np.uint8))
    save(root / "images" / "d.jpeg", np.zeros((4, 6, 3), dtype=np.uint8))
    save(root / "masks" / "d.png", np.zeros((4, 6), dtype=np.uint8))
    (root / "images" / "notes.txt").write_text("x")
    (root / "images" / ".hidden.png").write_bytes(b"")
    (root / "images" / "sub.png").mkdir()
    pairs = seg.folder_pairs(root)
    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a.png"), ("b.png", "b.png"), ("c.JPG", "c.png"),
                                                     ("d.jpeg", "d.png")]
    assert all(m.parent == root / "masks" for _, m in pairs)
    assert seg.folder_pairs(str(root)) == pairs


@pytest.mark.parametrize("path", [None, ""])
def test_folder_pairs_needs_a_path(path):
    with pytest.raises(PipelineError, match=r"^segprobe\.path is required for segprobe\.dataset folder$"):
        seg.folder_pairs(path)


def test_folder_pairs_errors_name_the_problem(tmp_path):
    with pytest.raises(PipelineError, match=rf"^missing segmentation folder: {tmp_path / 'no'}$"):
        seg.folder_pairs(tmp_path / "no")
    (tmp_path / "r").mkdir()
    with pytest.raises(PipelineError, match=rf"^missing segmentation folder: {tmp_path / 'r' / 'images'}$"):
        seg.folder_pairs(tmp_path / "r")
    (tmp_path / "r" / "images").mkdir()
    with pytest.raises(PipelineError, match=rf"^missing segmentation folder: {tmp_path / 'r' / 'masks'}$"):
        seg.folder_pairs(tmp_path / "r")
    (tmp_path / "r" / "masks").mkdir()
    with pytest.raises(PipelineError, match=rf"^{tmp_path / 'r' / 'images'} holds no \.png/\.jpg images$"):
        seg.folder_pairs(tmp_path / "r")


def test_two_images_of_one_stem_are_refused(tmp_path):
    root = make_folder(tmp_path, stems=("a", "b"))
    save(root / "images" / "b.jpg", np.zeros((4, 6, 3), dtype=np.uint8))
    with pytest.raises(PipelineError, match=rf"^{root / 'images'}: two images share the stem 'b'$"):
        seg.folder_pairs(root)


def test_missing_masks_are_counted(tmp_path):
    root = make_folder(tmp_path, stems=("a", "b", "c", "d"))
    (root / "masks" / "b.png").unlink()
    with pytest.raises(PipelineError, match=rf"^no mask {root / 'masks' / 'b.png'} for image "
                                            rf"{root / 'images' / 'b'}\.\*$"):
        seg.folder_pairs(root)
    (root / "masks" / "c.png").unlink()
    with pytest.raises(PipelineError, match=rf"^no mask {root / 'masks' / 'b.png'} for image "
                                            rf"{root / 'images' / 'b'}\.\* \(\+1 more\)$"):
        seg.folder_pairs(root)
    (root / "masks" / "d.png").unlink()
    with pytest.raises(PipelineError, match=rf"^no mask {root / 'masks' / 'b.png'} for image "
                                            rf"{root / 'images' / 'b'}\.\* \(\+2 more\)$"):
        seg.folder_pairs(root)


def test_one_pair_is_not_enough(tmp_path):
    root = make_folder(tmp_path, stems=("a",))
    with pytest.raises(PipelineError, match=rf"^{root}: need at least 2 image/mask pairs \(one train, one val\), "
                                            rf"found 1$"):
        seg.folder_pairs(root)
    make_folder(tmp_path, stems=("a", "b"))
    assert len(seg.folder_pairs(root)) == 2


def test_fit_resizes_the_shorter_side_and_crops_the_centre():
    arr = np.arange(10 * 16, dtype=np.uint8).reshape(10, 16)            # 16 wide, 10 high
    im = Image.fromarray(arr)
    out = seg._fit(im, 5, Image.Resampling.NEAREST)
    ref = im.resize((8, 5), Image.Resampling.NEAREST).crop((1, 0, 6, 5))   # 16 * 5 / 10 = 8; left (8 - 5) // 2
    assert out.size == (5, 5) and np.array_equal(np.asarray(out), np.asarray(ref))
    tall = Image.fromarray(arr.T.copy())                                # 10 wide, 16 high
    out = seg._fit(tall, 5, Image.Resampling.BILINEAR)
    ref = tall.resize((5, 8), Image.Resampling.BILINEAR).crop((0, 1, 5, 6))
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    same = Image.fromarray(arr[:, :13].copy())                          # 13 x 10 to 4: 13 * 0.4 = 5.2 -> 5
    assert np.array_equal(np.asarray(seg._fit(same, 4, Image.Resampling.NEAREST)),
                          np.asarray(same.resize((5, 4), Image.Resampling.NEAREST).crop((0, 0, 4, 4))))
    square = Image.fromarray(arr[:, :10].copy())
    assert np.array_equal(np.asarray(seg._fit(square, 10, Image.Resampling.BICUBIC)), arr[:, :10])
    wide = Image.fromarray(np.arange(2 * 9, dtype=np.uint8).reshape(2, 9))          # crop of an odd excess
    assert np.array_equal(np.asarray(seg._fit(wide, 2, Image.Resampling.NEAREST)), np.asarray(wide)[:, 3:5])


def test_read_pair_resizes_the_image_bicubic_and_the_mask_nearest(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (10, 16, 3), dtype=np.uint8)
    mask = rng.choice(np.array([0, 1, 2, 255], dtype=np.uint8), (10, 16))
    save(tmp_path / "i.png", rgb)
    save(tmp_path / "m.png", mask)
    x, m = seg._read_pair(tmp_path / "i.png", tmp_path / "m.png", "RGB", 5, None)
    ref = np.asarray(seg._fit(Image.fromarray(rgb), 5, Image.Resampling.BICUBIC))
    assert x.shape == (3, 5, 5) and x.dtype == torch.uint8 and np.array_equal(x.numpy(), ref.transpose(2, 0, 1))
    mref = np.asarray(seg._fit(Image.fromarray(mask), 5, Image.Resampling.NEAREST))
    assert m.shape == (5, 5) and m.dtype == torch.uint8 and np.array_equal(m.numpy(), mref)
    grey, _ = seg._read_pair(tmp_path / "i.png", tmp_path / "m.png", "L", 5, 3)
    gref = np.asarray(seg._fit(Image.fromarray(rgb).convert("L"), 5, Image.Resampling.BICUBIC))
    assert grey.shape == (1, 5, 5) and np.array_equal(grey[0].numpy(), gref)


@pytest.mark.parametrize("mode", ["L", "P", "I;16", "1"])
def test_single_channel_mask_modes_are_read(tmp_path, mode):
    save(tmp_path / "i.png", np.zeros((4, 4), dtype=np.uint8))
    mk = Image.fromarray(np.array([[0, 255 if mode == "1" else 1] * 2] * 4, dtype=np.uint8))
    mk = mk.convert(mode) if mode != "I;16" else Image.fromarray(np.array([[0, 1] * 2] * 4, dtype=np.uint16))
    mk.save(tmp_path / "m.png")
    _, m = seg._read_pair(tmp_path / "i.png", tmp_path / "m.png", "L", 4, 2)
    assert m[0].tolist() == [0, 1, 0, 1]


def test_read_pair_errors_name_the_file_and_the_problem(tmp_path):
    save(tmp_path / "i.png", np.zeros((4, 6), dtype=np.uint8))
    save(tmp_path / "rgb.png", np.zeros((4, 6, 3), dtype=np.uint8))
    with pytest.raises(PipelineError, match=rf"^{tmp_path / 'rgb.png'}: a mask must be single-channel class ids, "
                                            "got mode RGB$"):
        seg._read_pair(tmp_path / "i.png", tmp_path / "rgb.png", "L", 4, None)
    save(tmp_path / "small.png", np.zeros((3, 5), dtype=np.uint8))
    with pytest.raises(PipelineError, match=rf"^{tmp_path / 'small.png'} is 5x3 but its image "
                                            rf"{tmp_path / 'i.png'} is 6x4$"):
        seg._read_pair(tmp_path / "i.png", tmp_path / "small.png", "L", 4, None)
    values = np.zeros((4, 6), dtype=np.uint8)
    values[1, 2], values[2, 3] = 7, 3
    save(tmp_path / "m.png", values)
    with pytest.raises(PipelineError, match=rf"^{tmp_path / 'm.png'}: value 7 is outside the classes \[0, 3\) and "
                                            r"not 255 \(ignore\)$"):
        seg._read_pair(tmp_path / "i.png", tmp_path / "m.png", "L", 4, 3)
    seg._read_pair(tmp_path / "i.png", tmp_path / "m.png", "L", 4, 8)           # 7 < 8: fine
    values[1, 2] = 255
    save(tmp_path / "m.png", values)
    seg._read_pair(tmp_path / "i.png", tmp_path / "m.png", "L", 4, 4)           # 255 is ignore, 3 < 4
    seg._read_pair(tmp_path / "i.png", tmp_path / "m.png", "L", 4, None)        # no classes given: up to 254
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(PipelineError, match=rf"^cannot read {tmp_path / 'bad.png'} or its mask: "):
        seg._read_pair(tmp_path / "bad.png", tmp_path / "m.png", "L", 4, None)
    with pytest.raises(PipelineError, match=rf"^cannot read {tmp_path / 'i.png'} or its mask: "):
        seg._read_pair(tmp_path / "i.png", tmp_path / "bad.png", "L", 4, None)


def test_a_16_bit_mask_value_above_255_is_outside_the_classes(tmp_path):
    save(tmp_path / "i.png", np.zeros((2, 2), dtype=np.uint8))
    Image.fromarray(np.array([[0, 300], [1, 1]], dtype=np.uint16)).save(tmp_path / "m.png")
    with pytest.raises(PipelineError, match=r"value 300 is outside the classes \[0, 255\)"):
        seg._read_pair(tmp_path / "i.png", tmp_path / "m.png", "L", 2, None)


def write_dataset(root, n, classes_of=lambda i: i % 3, size=(6, 4)):
    rng = np.random.default_rng(1)
    for i in range(n):
        save(root / "images" / f"im{i:02d}.png", rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        mask = np.zeros((size[1], size[0]), dtype=np.uint8)
        mask[1, 2] = classes_of(i)            # inside the centre crop
        mask[-1, 1] = 255
        save(root / "masks" / f"im{i:02d}.png", mask)
    return root


@pytest.mark.parametrize("n, fraction, n_val", [(10, 0.2, 2), (10, 0.25, 3), (10, 0.24, 2), (4, 0.01, 1),
                                                (3, 0.9, 2), (5, 0.5, 3)])
def test_folder_split_is_the_seeded_permutation_with_val_fraction_rounded(tmp_path, n, fraction, n_val):
    root = write_dataset(tmp_path, n)
    ds = seg.folder_dataset(root, None, 4, 3, split_seed=4, val_fraction=fraction)
    order = np.random.default_rng(4).permutation(n)
    val, train = sorted(order[:n_val]), sorted(order[n_val:])
    reads = [seg._read_pair(i, m, "RGB", 4, None) for i, m in seg.folder_pairs(root)]
    assert torch.equal(ds.val_x, torch.stack([reads[i][0] for i in val]))
    assert torch.equal(ds.train_x, torch.stack([reads[i][0] for i in train]))
    assert torch.equal(ds.val_m, torch.stack([reads[i][1] for i in val]))
    assert torch.equal(ds.train_m, torch.stack([reads[i][1] for i in train]))
    assert ds.info["splits"] == {"val": {"images": n_val}, "train": {"images": n - n_val}}


def test_folder_record_and_classes_from_the_masks(tmp_path):
    root = write_dataset(tmp_path, 5, classes_of=lambda i: [0, 4, 2, 0, 1][i])
    ds = seg.folder_dataset(root, None, 4, 1, split_seed=0, val_fraction=0.2)
    assert ds.train_x.shape[1] == 1 and ds.num_classes == 5
    assert ds.info == {"name": "folder", "path": str(root), "pairs": 5, "img_size": 4, "split_seed": 0,
                       "val_fraction": 0.2, "splits": {"val": {"images": 1}, "train": {"images": 4}},
                       "num_classes": 5, "class_names": ["0", "1", "2", "3", "4"], "ignore": 255}
    given = seg.folder_dataset(root, 7, 4, 1, split_seed=0, val_fraction=0.2)
    assert given.num_classes == 7 and given.info["num_classes"] == 7 and given.class_names[-1] == "6"


def test_folder_classes_bounds(tmp_path):
    root = write_dataset(tmp_path, 3, classes_of=lambda i: 1 if i == 2 else 0)
    assert seg.folder_dataset(root, None, 4, 1, 0, 0.3).num_classes == 2          # 1 + the largest value
    assert seg.folder_dataset(root, 255, 4, 1, 0, 0.3).num_classes == 255
    with pytest.raises(PipelineError, match=r"^segprobe\.num_classes must be at most 255 \(255 is ignore\), "
                                            r"got 256$"):
        seg.folder_dataset(root, 256, 4, 1, 0, 0.3)
    flat = write_dataset(tmp_path / "flat", 3, classes_of=lambda i: 0)
    with pytest.raises(PipelineError, match=rf"^{flat}: the masks hold fewer than 2 classes; set "
                                            r"segprobe\.num_classes$"):
        seg.folder_dataset(flat, None, 4, 1, 0, 0.3)
    assert seg.folder_dataset(flat, 2, 4, 1, 0, 0.3).num_classes == 2


def test_folder_masks_all_ignore_count_no_class(tmp_path):
    """Masks that are all 255 add no class; the others give 1 + their largest value."""
    root = write_dataset(tmp_path, 3, classes_of=lambda i: 3)
    save(root / "masks" / "im00.png", np.full((4, 6), 255, dtype=np.uint8))
    assert seg.folder_dataset(root, None, 4, 1, 0, 0.3).num_classes == 4


# ---- the head and the metrics --------------------------------------------------------------------------

def test_head_is_batchnorm_without_affine_then_a_small_linear():
    torch.manual_seed(0)
    head = seg.SegHead(6, 3, 2, 4)
    assert isinstance(head.norm, torch.nn.BatchNorm1d) and not head.norm.affine and head.norm.eps == 1e-6
    assert head.norm.num_features == 6 and head.norm.weight is None
    assert head.linear.in_features == 6 and head.linear.out_features == 3
    assert head.linear.weight.abs().max() <= 0.02 and 0.003 < head.linear.weight.std() < 0.03
    assert torch.equal(head.linear.bias, torch.zeros(3))
    torch.manual_seed(0)
    ref = torch.nn.Linear(6, 3)
    torch.nn.init.trunc_normal_(ref.weight, std=0.01)
    assert torch.equal(head.linear.weight, ref.weight)
    assert set(head.state_dict()) == {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked",
                                      "linear.weight", "linear.bias"}             # the upsampling is not saved
    assert torch.equal(head.up_h, seg.interpolation_matrix(2, 4)) and torch.equal(head.up_w, head.up_h)


def test_head_logits_are_the_normalised_linear_per_token_upsampled():
    torch.manual_seed(1)
    head = seg.SegHead(5, 3, 2, 6)
    with torch.no_grad():
        head.linear.weight.normal_()
        head.linear.bias.normal_()
    tokens = torch.randn(4, 4, 5, generator=torch.Generator().manual_seed(0))
    head.train()
    flat = tokens.reshape(16, 5)
    normed = (flat - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + 1e-6)
    grid = (normed @ head.linear.weight.T + head.linear.bias).view(4, 2, 2, 3).permute(0, 3, 1, 2)
    assert torch.allclose(head.grid_logits(tokens), grid, atol=1e-5)
    ref = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False)
    assert torch.allclose(head(tokens), ref, atol=1e-5)
    with pytest.raises(PipelineError, match=r"^5 patch tokens do not make a 2x2 grid$"):
        head.grid_logits(torch.randn(4, 5, 5))


def test_predictions_are_the_per_pixel_argmax_in_batches():
    torch.manual_seed(2)
    head = seg.SegHead(5, 4, 2, 6)
    with torch.no_grad():
        head.linear.weight.normal_()
    head.train()
    tokens = torch.randn(5, 4, 5, generator=torch.Generator().manual_seed(0))
    pred = seg.predict(head, tokens, batch_size=2)
    assert not head.training and pred.dtype == torch.uint8 and pred.shape == (5, 6, 6)
    with torch.no_grad():
        assert torch.equal(pred, head(tokens).argmax(1).to(torch.uint8))
    assert torch.equal(seg.predict(head, tokens), pred)


def test_metrics_of_empty_and_one_sided_confusions():
    assert seg.iou_scores(torch.zeros(3, 3, dtype=torch.long)) == ({"miou": 0.0, "pixel_acc": 0.0},
                                                                    [None, None, None])
    conf = seg.confusion(torch.tensor([1, 2, 2, 0]), torch.tensor([1, 1, 255, 255]), 3)
    assert conf.tolist() == [[0, 0, 0], [0, 1, 1], [0, 0, 0]] and conf.dtype == torch.int64
    scores, ious = seg.iou_scores(conf)
    assert ious == [None, 0.5, 0.0] and scores == {"miou": 0.25, "pixel_acc": 0.5}


def test_evaluate_head_scores_the_predictions():
    torch.manual_seed(3)
    head = seg.SegHead(5, 3, 2, 4)
    with torch.no_grad():
        head.linear.weight.normal_()
    tokens = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    masks = torch.randint(0, 3, (3, 4, 4), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    masks[0, 0] = 255
    expected = seg.iou_scores(seg.confusion(seg.predict(head, tokens), masks, 3))
    assert seg.evaluate_head(head, tokens, masks, 3, batch_size=1) == expected


# ---- training ------------------------------------------------------------------------------------------

def reference_probe(train_t, train_m, val_t, val_m, k, grid, epochs, bs, lr, wd, seed, stride):
    """The documented loop, written out: init under torch.manual_seed(seed), shuffles from Generator(seed),
    AdamW + cosine lr per step, loss = summed CE over the valid pixels of the epoch's lattice / their count."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = seg.SegHead(train_t.shape[-1], k, grid, train_m.shape[-1])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * math.ceil(len(train_t) / bs)
    size, history, step = train_m.shape[-1], [], 0
    for epoch in range(epochs):
        head.train()
        r0, c0 = epoch % stride, (epoch // stride) % stride
        rows, cols = torch.arange(r0, size, stride), torch.arange(c0, size, stride)
        order = torch.randperm(len(train_t), generator=gen)
        total, pixels = 0.0, 0
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            target = train_m[idx][:, rows][:, :, cols].long()
            valid = int((target != 255).sum())
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(head(train_t[idx], rows, cols), target, ignore_index=255, reduction="sum")
            loss = loss / max(valid, 1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            total, pixels = total + loss.item() * valid, pixels + valid
        head.eval()
        with torch.no_grad():
            pred = head(val_t).argmax(1)
        keep = val_m != 255
        conf = torch.zeros(k, k, dtype=torch.float64)
        for g, p in zip(val_m[keep].long().tolist(), pred[keep].tolist()):
            conf[g, p] += 1
        tp = conf.diag()
        union = conf.sum(0) + conf.sum(1) - tp
        ious = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
        seen = [v for v in ious if v is not None]
        metrics = {"miou": sum(seen) / len(seen), "pixel_acc": float(tp.sum() / conf.sum())}
        history.append({"epoch": epoch, "train_loss": total / max(pixels, 1), "val_miou": metrics["miou"]})
    return metrics, ious, history, head


def tokens_and_masks(n, grid=2, size=6, classes=3, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, grid * grid, dim, generator=g)
    masks = torch.randint(0, classes, (n, size, size), generator=g).to(torch.uint8)
    masks[torch.rand(n, size, size, generator=g) < 0.2] = 255
    return tokens, masks


@pytest.mark.parametrize("stride, epochs, n, bs", [(2, 5, 7, 3), (3, 4, 6, 6), (None, 2, 5, 2)])
def test_training_follows_the_documented_loop(stride, epochs, n, bs):
    train_t, train_m = tokens_and_masks(n)
    val_t, val_m = tokens_and_masks(3, seed=1)
    torch.manual_seed(123)                              # the global RNG does not matter, and is left as it was
    state = torch.get_rng_state()
    metrics, ious, history, head = seg.train_probe(train_t, train_m, val_t, val_m, 3, 2, epochs, bs, 0.05, 0.1,
                                                   seed=4, stride=stride)
    assert torch.equal(torch.get_rng_state(), state)
    ref = reference_probe(train_t, train_m, val_t, val_m, 3, 2, epochs, bs, 0.05, 0.1, 4,
                          stride or seg.loss_stride(6, 2))
    assert not head.training
    assert torch.allclose(head.linear.weight, ref[3].linear.weight, atol=1e-5)
    assert torch.allclose(head.linear.bias, ref[3].linear.bias, atol=1e-5)
    assert torch.allclose(head.norm.running_mean, ref[3].norm.running_mean, atol=1e-6)
    assert [h["epoch"] for h in history] == list(range(epochs))
    for got, want in zip(history, ref[2]):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
        assert got["val_miou"] == pytest.approx(want["val_miou"], rel=1e-6)
    assert metrics == pytest.approx(ref[0], rel=1e-6) and ious == pytest.approx(ref[1], rel=1e-6)


def test_the_loss_lattice_of_big_images_has_four_pixels_per_patch():
    """The default stride is loss_stride(size, grid): 16-px masks on a 2x2 grid -> stride 2."""
    train_t, train_m = tokens_and_masks(4, size=16)
    val_t, val_m = tokens_and_masks(2, size=16, seed=1)
    got = seg.train_probe(train_t, train_m, val_t, val_m, 3, 2, 3, 2, 0.05, 0.0, seed=0)
    want = seg.train_probe(train_t, train_m, val_t, val_m, 3, 2, 3, 2, 0.05, 0.0, seed=0, stride=2)
    other = seg.train_probe(train_t, train_m, val_t, val_m, 3, 2, 3, 2, 0.05, 0.0, seed=0, stride=1)
    assert got[2] == want[2] and got[2] != other[2]
    assert seg.loss_stride(16, 2) == 2 and seg.loss_stride(15, 2) == 1 and seg.loss_stride(7, 1) == 1


def test_a_batch_without_valid_pixels_adds_no_loss():
    train_t, train_m = tokens_and_masks(4)
    train_m[:2] = 255
    val_t, val_m = tokens_and_masks(2, seed=1)
    metrics, _, history, _ = seg.train_probe(train_t, train_m, val_t, val_m, 3, 2, 2, 1, 0.05, 0.0, seed=0, stride=1)
    ref = reference_probe(train_t, train_m, val_t, val_m, 3, 2, 2, 1, 0.05, 0.0, 0, 1)
    assert [h["train_loss"] for h in history] == pytest.approx([h["train_loss"] for h in ref[2]], rel=1e-5)
    assert all(math.isfinite(h["train_loss"]) for h in history)


def test_one_valid_pixel_is_its_own_mean():
    """The loss is the sum over valid pixels divided by their count, also when a batch (and the epoch) has one."""
    train_t, train_m = tokens_and_masks(3)
    train_m[:] = 255
    train_m[1, 2, 3] = 1
    val_t, val_m = tokens_and_masks(2, seed=1)
    _, _, history, _ = seg.train_probe(train_t, train_m, val_t, val_m, 3, 2, 2, 1, 0.05, 0.0, seed=0, stride=1)
    ref = reference_probe(train_t, train_m, val_t, val_m, 3, 2, 2, 1, 0.05, 0.0, 0, 1)
    assert [h["train_loss"] for h in history] == pytest.approx([h["train_loss"] for h in ref[2]], rel=1e-5)


@pytest.mark.parametrize(("src", "dst"), [(2, 4), (3, 50), (7, 98), (14, 224)])
def test_the_upsampling_matrix_is_linear_interpolation_in_float64_rounded_once(src, dst):
    """Row i: the weights of 1-D linear interpolation (align_corners=False) at x = (i + 1/2) src / dst - 1/2 (clamped
    to the first sample), computed in float64 and rounded to float32 once: bit for bit."""
    want = torch.zeros(dst, src, dtype=torch.float64)
    for i in range(dst):
        x = max((i + 0.5) * src / dst - 0.5, 0.0)
        lo = min(int(x), src - 1)
        hi, frac = min(lo + 1, src - 1), x - lo
        want[i, lo] += 1 - frac
        want[i, hi] += frac
    assert torch.equal(seg.interpolation_matrix(src, dst), want.float())


# ---- the figure ----------------------------------------------------------------------------------------

def test_class_colours_are_black_tab10_tab20_then_hues_and_white_last():
    from matplotlib import colormaps

    tab = list(colormaps["tab10"].colors) + list(colormaps["tab20"].colors[1::2])
    c = seg.class_colours(5)
    assert c == [(0.0, 0.0, 0.0)] + tab[:4] + [(1.0, 1.0, 1.0)]
    assert seg.class_colours(21) == [(0.0, 0.0, 0.0)] + tab + [(1.0, 1.0, 1.0)]
    many = seg.class_colours(24)                   # 20 table colours then 3 evenly spaced hues
    assert many[1:21] == tab and many[-1] == (1.0, 1.0, 1.0) and len(many) == 25
    assert many[21:24] == [colormaps["hsv"](i / 3)[:3] for i in range(3)]
    assert seg.class_colours(22)[21] == colormaps["hsv"](0.0)[:3]
    assert seg.class_colours(1) == [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0)]


def test_examples_figure_text_and_layout():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    images[1, 0] = 200
    masks = torch.zeros(2, 4, 4, dtype=torch.uint8)
    names = [f"n{i}" for i in range(8)]
    fig = seg.examples_figure(images, masks, masks, names, "the title")
    assert [ax.get_title() for ax in fig.axes] == ["image", "ground truth", "prediction", "", "", ""]
    assert all(list(ax.get_xticks()) == [] and list(ax.get_yticks()) == [] for ax in fig.axes)
    assert fig._suptitle.get_text() == "the title"
    legend, = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == names and legend._ncols == 6
    drawn = fig.axes[3].get_images()[0].get_array()
    assert drawn.shape == (4, 4, 3) and int(drawn[0, 0, 0]) == 200
    for ax in fig.axes[1:3]:
        im = ax.get_images()[0]
        assert im.get_clim() == (-0.5, 8.5) and im.get_interpolation() == "nearest"
    assert fig.get_size_inches().tolist() == pytest.approx([7.5, 2.3 * 2 + 0.8])
    grey = seg.examples_figure(images[:1, :1], masks[:1], masks[:1], names[:3])
    im = grey.axes[0].get_images()[0]
    assert im.get_cmap().name == "gray" and im.get_clim() == (0, 255) and grey._suptitle is None
    assert grey.legends[0]._ncols == 3


def test_fit_crops_the_centre_of_a_two_pixel_excess():
    tall = Image.fromarray(np.arange(6 * 4, dtype=np.uint8).reshape(6, 4))      # 4 wide, 6 high, to 4: top 1
    assert np.array_equal(np.asarray(seg._fit(tall, 4, Image.Resampling.NEAREST)), np.asarray(tall)[1:5])


def test_masks_that_are_all_ignore_hold_no_class(tmp_path):
    root = write_dataset(tmp_path, 3, classes_of=lambda i: 255)
    for mask in (root / "masks").iterdir():
        Image.fromarray(np.full((4, 6), 255, dtype=np.uint8)).save(mask)
    with pytest.raises(PipelineError, match="the masks hold fewer than 2 classes"):
        seg.folder_dataset(root, None, 4, 1, 0, 0.3)


def test_32_bit_integer_masks_are_read(tmp_path):
    save(tmp_path / "i.png", np.zeros((2, 2), dtype=np.uint8))
    Image.fromarray(np.array([[0, 1], [2, 255]], dtype=np.int32)).save(tmp_path / "m.tif")
    assert Image.open(tmp_path / "m.tif").mode.startswith("I")
    _, m = seg._read_pair(tmp_path / "i.png", tmp_path / "m.tif", "L", 2, 3)
    assert m.tolist() == [[0, 1], [2, 255]]


def test_big_endian_16_bit_masks_are_read(tmp_path):
    save(tmp_path / "i.png", np.zeros((1, 2), dtype=np.uint8))
    Image.frombytes("I;16B", (2, 1), np.array([1, 2], dtype=">u2").tobytes()).save(tmp_path / "m.tif")
    assert Image.open(tmp_path / "m.tif").mode == "I;16B"
    _, m = seg._read_pair(tmp_path / "i.png", tmp_path / "m.tif", "L", 1, 3)
    assert m.tolist() == [[1]] or m.tolist() == [[2]]
