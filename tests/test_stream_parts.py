"""pipeline.data.stream's parts, against their docstrings: the Pillow path of read_image (what is not a JPEG: PNG,
16-bit, palette, EXIF-rotated) converted as the tensor format converts, and channel_stats' fixed seeded sample of
distinct train images, with its progress bar. Tiny PNG folders, no workers."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import checkpoint, layout
from pipeline.data import stream
from pipeline.data.datasets import tensor_channel_stats
from pipeline.errors import PipelineError
from pipeline.settings import Loader, Stream


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


def test_tensor_decodes_every_image_in_its_place_in_chunks_with_a_progress_bar(tmp_path, capsys):
    """tensor(): every image of the split, in order, as uint8, filled 256 images a chunk (524 train images: three
    chunks); with a desc, a progress bar of images against the split's size; without one, no output."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "im" / f"c{c}").mkdir(parents=True)
        for i in range(350):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "im" / f"c{c}" / f"{i}.png")
    d = dict(DATA, path=str(tmp_path / "im"))
    man = stream.scan(d, 0)
    train = stream.split_images(man, "train", Stream.folder(d))
    capsys.readouterr()
    x = train.tensor()
    assert capsys.readouterr().err == ""
    expected = torch.stack([train.files[i][0] for i in range(len(man.paths["train"]))])     # item by item
    assert x.dtype == torch.uint8 and len(x) == 524 and torch.equal(x, expected)
    train.tensor(desc="decode")
    assert "decode: 100%" in (err := capsys.readouterr().err) and "524/524 [" in err and "img/s]" in err


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


# ---- the manifest and its sidecar, load ---------------------------------------------------------------------

def manifest():
    rows = {"train": [("a/0.png", 10, 0), ("b/0.png", 11, 1), ("c/0.png", 12, 2)], "val": [("a/1.png", 13, 0)]}
    return stream.Manifest.of(rows, ["a", "b", "c"], {".txt": 2, ".csv": 1})


def test_the_sidecar_says_what_the_manifest_holds(tmp_path):
    path = tmp_path / "m.jsonl"
    meta = stream.save_manifest(manifest(), path, {"mean": [0.5], "std": [0.2]})
    assert meta["format"] == "stream" and meta["file"] == "m.jsonl" and meta["class_names"] == ["a", "b", "c"]
    assert meta["class_counts"] == {"train": [1, 1, 1], "val": [1, 0, 0]}        # every class, none left off
    assert meta["skipped_files"] == 3 and meta["skipped_extensions"] == {".csv": 1, ".txt": 2}
    assert json.loads((tmp_path / "m.json").read_text()) == meta
    man, back = stream.read_manifest(path)
    assert back == meta and man.skipped == {".csv": 1, ".txt": 2} and man.labels["train"].tolist() == [0, 1, 2]
    del back["skipped_extensions"]                    # a sidecar without it: nothing skipped
    (tmp_path / "m.json").write_text(json.dumps(back))
    assert stream.read_manifest(path)[0].skipped == {}


def test_a_missing_manifest_or_a_foreign_sidecar_is_one_error_saying_so(tmp_path):
    path = tmp_path / "m.jsonl"
    with pytest.raises(PipelineError) as e:
        stream.read_manifest(path)
    assert str(e.value) == f"missing input {path}: run prepare_data first"
    meta = stream.save_manifest(manifest(), path, {"mean": [0.5], "std": [0.2]})
    del meta["mean"]
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(PipelineError) as e:
        stream.read_manifest(path)
    assert str(e.value) == f"{tmp_path / 'm.json'} is not the sidecar of a manifest; rerun prepare_data"


@pytest.mark.parametrize("entry", [{"split": "test", "path": "a/0.png", "label": 0, "size": 3},
                                   {"split": "train", "path": "a/0.png", "label": 3, "size": 3},
                                   {"split": "train", "path": "a/0.png", "label": -1, "size": 3}])
def test_a_manifest_line_that_is_no_entry_is_one_error(tmp_path, entry):
    path = tmp_path / "m.jsonl"
    stream.save_manifest(manifest(), path, {"mean": [0.5], "std": [0.2]})
    path.write_text(path.read_text() + json.dumps(entry) + "\n")
    meta = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps(dict(meta, sha256=checkpoint.sha256_file(path))))
    with pytest.raises(PipelineError) as e:
        stream.read_manifest(path)
    assert str(e.value) == (f"{path} line 5 is not a manifest entry (split, path, label in [0, 3), size); "
                            "rerun prepare_data")


def test_load_gives_the_splits_labels_names_and_stats(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = dict(DATA, path=str(constant_folder(tmp_path / "im")))
    man = stream.scan(d, 0)
    stream.save_manifest(man, layout.MANIFEST, {"mean": [0.25], "std": [0.5]})
    p = stream.load(Stream.folder(d))
    assert isinstance(p.train_x, stream.StreamImages) and isinstance(p.val_x, stream.StreamImages)
    assert len(p.train_x) == 6 and len(p.val_x) == 2 and p.train_x.shape == (6, 1, 16, 16)
    assert torch.equal(p.train_y, man.labels["train"]) and torch.equal(p.val_y, man.labels["val"])
    assert p.class_names == ["c0", "c1"] and p.mean == [0.25] and p.std == [0.5]
    assert p.source == str(tmp_path / "im")              # no source in the sidecar: the folder
    assert len(p.train_x[1:4]) == 3 and len(p.train_x[np.array([0, 5])]) == 2
    assert len(p.train_x[torch.tensor([1, 2])]) == 2
    stream.save_manifest(man, layout.MANIFEST, {"mean": [0.25], "std": [0.5], "source": "my folder"})
    assert stream.load(Stream.folder(d)).source == "my folder"


# ---- _Files: the item, its mode, unreadable files under skip -------------------------------------------------

def test_an_item_is_in_the_datasets_channels(tmp_path):
    root = tmp_path / "im"
    (root / "a").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (16, 16), (200, 10 * i, 0)).save(root / "a" / f"{i}.png")
    d = dict(DATA, path=str(root), val_fraction=0.25)
    man = stream.scan(d, 0)
    x, y, skipped = stream.split_images(man, "train", Stream.folder(d)).files[0]
    assert x.shape == (1, 16, 16) and int(y) == 0 and skipped == ""
    x, _, _ = stream.split_images(man, "train", Stream.folder(dict(d, channels=3))).files[0]
    assert x.shape == (3, 16, 16) and x[0].eq(200).all() and x[2].eq(0).all()          # RGB, as saved


def test_the_loader_gets_the_launchs_settings_and_the_workers_guard(tmp_path):
    """The DataLoader of a streamed split: workers (never more than batches), prefetch and pinned memory from the
    launch (settings.Loader), persistent workers, and each worker ending with this process (_die_with_parent)."""
    d = dict(DATA, path=str(constant_folder(tmp_path / "im")))
    images = stream.split_images(stream.scan(d, 0), "train", Stream.folder(d, Loader(workers=3, prefetch=5, pin=True)))
    loader = images._loader([[0, 1], [2, 3]])
    assert loader.num_workers == 2 and loader.prefetch_factor == 5 and loader.persistent_workers
    assert loader.pin_memory is True
    assert loader.worker_init_fn.func is stream._die_with_parent and loader.worker_init_fn.args == (os.getpid(),)
    in_process = stream.split_images(stream.scan(d, 0), "train", Stream.folder(d))._loader([[0, 1]])
    assert in_process.num_workers == 0 and in_process.pin_memory is False


def test_a_manifest_keeps_its_dtypes_for_an_empty_split():
    man = stream.Manifest.of({"train": [("a/0.png", 10, 1)], "val": []}, ["a", "b"], {})
    for split in ("train", "val"):
        assert man.paths[split].dtype.kind == "S" and man.sizes[split].dtype == np.int64
        assert man.labels[split].dtype == torch.int64
    assert man.paths["train"].tolist() == [b"a/0.png"] and man.sizes["train"].tolist() == [10]


def test_scan_lists_with_a_progress_bar_and_needs_a_val_split(tmp_path, capsys):
    d = dict(DATA, path=str(constant_folder(tmp_path / "im")))
    capsys.readouterr()
    stream.scan(d, 0)
    err = capsys.readouterr().err
    assert "prepare_data listing: 100%" in err and "8/8 [" in err and "file/s]" in err
    few = constant_folder(tmp_path / "few", n_per_class=1)
    with pytest.raises(PipelineError) as e:
        stream.scan(dict(d, path=str(few)), 0)
    assert str(e.value) == f"{few}: the val split is empty (too few images per class for val_fraction)"


def bad_folder(root, names):
    """Files a/<name> (those named bad: not images) and the manifest listing them all, in order, as train."""
    (root / "a").mkdir(parents=True)
    for i, name in enumerate(names):
        if "bad" in name:
            (root / "a" / name).write_bytes(b"not an image at all")
        else:
            Image.new("L", (16, 16), 10 + 40 * i).save(root / "a" / name)
    rows = [(f"a/{n}", (root / "a" / n).stat().st_size, 0) for n in names]
    return stream.Manifest.of({"train": rows, "val": rows[:1]}, ["a"], {})


def test_under_skip_an_unreadable_image_gives_the_next_readable_one_and_says_why(tmp_path):
    root = tmp_path / "im"
    man = bad_folder(root, ["0.png", "1: bad.png", "2.png", "3.png"])
    d = dict(DATA, path=str(root), bad_images="skip")
    files = stream.split_images(man, "train", Stream.folder(d)).files
    x, _, skipped = files[1]
    assert int(x[0, 0, 0]) == 90                          # 2.png's grey
    path, reason = skipped.split("\t")
    assert path == "a/1: bad.png" and reason.startswith("cannot identify image file")


def test_under_skip_no_readable_image_is_one_error(tmp_path):
    root = tmp_path / "im"
    man = bad_folder(root, ["0.bad.png", "1.bad.png"])
    d = dict(DATA, path=str(root), bad_images="skip")
    files = stream.split_images(man, "train", Stream.folder(d)).files
    with pytest.raises(PipelineError) as e:
        files[0]
    assert str(e.value) == f"no image of {root} is readable (data.bad_images: skip)"


def test_a_train_item_is_mirrored_for_some_keys_when_hflip_is_on(tmp_path):
    root = tmp_path / "im"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) * 10, (16, 1))).save(root / "a" / "0.png")
    Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) * 10, (16, 1))).save(root / "a" / "1.png")
    d = dict(DATA, path=str(root), val_fraction=0.5)
    man = stream.scan(d, 0)
    mirrored = []
    for hflip in (True, False):
        files = stream.split_images(man, "train", Stream.folder(d, hflip=hflip)).files
        mirrored.append([int(files[(0, e, 0)][0][0, 0, 0]) > int(files[(0, e, 0)][0][0, 0, -1]) for e in range(8)])
    assert any(mirrored[0]) and not all(mirrored[0]) and not any(mirrored[1])


# ---- read_image: the size check, JPEGs by torchvision ----------------------------------------------------------

def test_a_file_whose_size_changed_is_one_error_asking_for_prepare_data(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    n = (tmp_path / "x.png").stat().st_size
    with pytest.raises(PipelineError) as e:
        stream.read_image(str(tmp_path / "x.png"), n + 1, "RGB")
    assert str(e.value) == (f"{tmp_path / 'x.png'} has {n} bytes, the manifest says {n + 1}: the folder changed "
                            "since prepare_data; rerun it")


def test_jpegs_are_decoded_by_torchvision(tmp_path, monkeypatch):
    import torchvision.io

    Image.new("RGB", (8, 8), (200, 100, 50)).save(tmp_path / "x.jpg", quality=95)
    Image.new("RGB", (8, 8), (200, 100, 50)).save(tmp_path / "x.png")
    calls = []
    decode = torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda *a, **k: calls.append(1) or decode(*a, **k))
    x = read(tmp_path / "x.jpg", "RGB")
    assert calls == [1] and x.shape == (3, 8, 8) and abs(int(x[0, 4, 4]) - 200) <= 3
    read(tmp_path / "x.png", "RGB")
    assert calls == [1]


def test_a_jpeg_is_decoded_exif_rotated_and_in_the_mode_asked(tmp_path):
    """torchvision's path too: a JPEG whose EXIF orientation says "rotate 90" (6) comes out rotated, as Pillow's
    path turns it (exif_transpose), and mode L gives one channel, Pillow's grey."""
    from PIL import ImageOps

    pixels = np.zeros((4, 8, 3), dtype=np.uint8)
    pixels[:, :4] = (250, 250, 250)                                   # left half white, right half black
    exif = Image.Exif()
    exif[0x0112] = 6                                                  # Orientation: rotate 90 CW to display
    Image.fromarray(pixels).save(tmp_path / "r.jpg", quality=95, exif=exif)
    x = read(tmp_path / "r.jpg", "RGB")
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "r.jpg")))
    assert x.shape == (3, 8, 4) and upright.shape == (8, 4, 3)       # 4 x 8 stored, 8 x 4 shown
    assert (x.permute(1, 2, 0).int() - torch.from_numpy(upright).int()).abs().max() <= 8
    g = read(tmp_path / "r.jpg", "L")
    grey = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "r.jpg")).convert("L"))
    assert g.shape == (1, 8, 4) and (g[0].int() - torch.from_numpy(grey).int()).abs().max() <= 8
