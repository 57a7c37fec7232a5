"""data.format stream (pipeline/data/stream.py): the manifest, per-sample deterministic crops, the DDP rows contract,
skipped and bad files, and the format's resolution."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import config, layout
from pipeline.checkpoint import sha256_file
from pipeline.data import folders, stream
from pipeline.data.steps import batch_indices
from pipeline.errors import PipelineError
from pipeline.settings import Stream

DATA = {"dataset": "imagefolder", "img_size": 16, "channels": 3, "val_fraction": 0.25, "split_seed": 0,
        "format": "stream", "tensor_budget_gb": 1}


def image_folder(root: Path, classes: int = 3, per_class: int = 8, seed: int = 0, extras: bool = True) -> Path:
    """Class folders of random-sized (40-60 px) q90 JPEGs whose brightness follows the class; with `extras`, two
    non-image files and a hidden one."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = rng.integers(40, 61, 2)
            pixels = (rng.random((h, w, 3)) * 80 + 60 * c).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i:03d}.jpg", quality=90)
    if extras:
        (root / "class0" / "notes.txt").write_text("not an image")
        (root / "class1" / "labels.csv").write_text("a,b\n")
        (root / "class1" / ".DS_Store").write_bytes(b"\0")
    return root


def prepared(tmp_path, monkeypatch, **kw):
    """An image folder and its manifest in tmp_path (the working directory); returns (data params, loaded)."""
    monkeypatch.chdir(tmp_path)
    d = dict(DATA, path=str(image_folder(tmp_path / "images", **kw)))
    man = stream.scan(d, 0)
    mean, std = stream.channel_stats(man, Stream.folder(d), 0)
    stream.save_manifest(man, layout.MANIFEST, {"mean": mean, "std": std})
    return d, man


def params_for(d: dict, workers: int = 0) -> dict:
    return {"data": d, "launch": {"data_workers": workers, "prefetch_batches": 2, "device": "cpu"},
            "pretrain": {"crop_scale": [0.2, 1.0], "hflip": True}}


def test_manifest_lists_images_with_labels_and_sizes_and_hashes_itself(tmp_path, monkeypatch):
    d, man = prepared(tmp_path, monkeypatch)
    rows = [json.loads(line) for line in layout.MANIFEST.read_text().splitlines()]
    meta = json.loads(layout.sidecar(layout.MANIFEST).read_text())
    assert meta["sha256"] == meta["dataset_hash"] == sha256_file(layout.MANIFEST)
    assert meta["class_names"] == ["class0", "class1", "class2"] and meta["skipped_files"] == 2   # .DS_Store: hidden
    assert meta["skipped_extensions"] == {".csv": 1, ".txt": 1} == man.skipped    # folders.image_files, as tensor
    assert meta["counts"] == {"train": 18, "val": 6} and meta["class_counts"]["val"] == [2, 2, 2]
    assert [r["split"] for r in rows] == ["train"] * 18 + ["val"] * 6
    root = Path(d["path"])
    for r in rows:
        assert r["size"] == (root / r["path"]).stat().st_size and r["path"].endswith(".jpg")
        assert r["label"] == int(r["path"][5])
    assert len(meta["mean"]) == 3 and all(0 < s for s in meta["std"])
    again, _ = stream.read_manifest()
    assert again.class_names == man.class_names and torch.equal(again.labels["val"], man.labels["val"])


def test_the_split_is_the_tensor_formats(tmp_path, monkeypatch):
    d, man = prepared(tmp_path, monkeypatch, extras=False)
    train, val = folders.split_folder(Path(d["path"]), d["val_fraction"], 0)
    listed = [str(f.relative_to(d["path"])).encode() for files in val.values() for f in files]
    assert man.paths["val"].tolist() == listed and len(man.paths["train"]) == sum(map(len, train.values()))


def train_run(images, start=0, total=4, rows=slice(None), bs=8):
    return [(x, y) for x, y in images.train_batches(batch_indices, bs, 7, rows, start, total)]


def test_crops_depend_on_seed_epoch_index_only_not_on_workers_or_resume(tmp_path, monkeypatch):
    d, _ = prepared(tmp_path, monkeypatch)
    one = stream.load(Stream.of(params_for(d, workers=0))).train_x
    two = stream.load(Stream.of(params_for(d, workers=2))).train_x
    a, b, resumed = train_run(one), train_run(two), train_run(one, start=2)
    assert all(torch.equal(x, y) and torch.equal(la, lb) for (x, la), (y, lb) in zip(a, b))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a[2:], resumed))
    assert a[0][0].shape == (8, 3, 16, 16) and a[0][0].dtype == torch.uint8
    files = one.files       # the same image in another epoch is another crop; in the same epoch, the same one
    first, again = files[(7, 0, 3)][0], files[(7, 0, 3)][0]
    assert torch.equal(first, again) and not torch.equal(first, files[(7, 1, 3)][0])


def test_two_ranks_read_the_rows_of_the_global_batch(tmp_path, monkeypatch):
    d, man = prepared(tmp_path, monkeypatch)
    images = stream.load(Stream.of(params_for(d))).train_x
    whole = train_run(images, total=3)
    ranks = [train_run(images, total=3, rows=slice(r * 4, (r + 1) * 4)) for r in (0, 1)]
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), x)
        assert torch.equal(y, man.labels["train"][batch_indices(18, 8, 7, step)])


def test_eval_transform_is_resize_then_centre_crop():
    x = torch.arange(350 * 400, dtype=torch.float32).view(1, 350, 400).div(560).to(torch.uint8).expand(3, -1, -1)
    out = stream.eval_transform(x, 224)
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8      # 350 -> 256, 400 -> 293, crop the middle
    small = stream.eval_transform(x, 28)
    assert small.shape == (3, 28, 28)
    for w, h in ((400, 350), (50, 400), (400, 20)):
        left, top, cw, ch = stream.crop_box(w, h, (0.08, 1.0), np.random.default_rng(0))
        assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h and cw > 0 and ch > 0


def test_a_changed_manifest_is_refused(tmp_path, monkeypatch):
    prepared(tmp_path, monkeypatch)
    lines = layout.MANIFEST.read_text().splitlines()
    layout.MANIFEST.write_text("\n".join([lines[1], lines[0]] + lines[2:]) + "\n")
    with pytest.raises(PipelineError, match="manifest.jsonl is corrupt: its sha256 does not match"):
        stream.read_manifest()
    layout.MANIFEST.write_text("\n".join(lines[:-1] + ['{"split": "val", "path": "x.jpg"}']) + "\n")
    meta = json.loads(layout.sidecar(layout.MANIFEST).read_text())
    layout.sidecar(layout.MANIFEST).write_text(json.dumps(dict(meta, sha256=sha256_file(layout.MANIFEST))))
    with pytest.raises(PipelineError, match="manifest.jsonl line 24 is not a manifest entry"):
        stream.read_manifest()


@pytest.mark.parametrize("change, message", [
    (lambda f: f.unlink(), "missing image .*class0/img000.jpg .listed in the manifest.; rerun prepare_data"),
    (lambda f: f.write_bytes(f.read_bytes() + b"\0"), "img000.jpg has [0-9]+ bytes, the manifest says"),
])
def test_a_missing_or_changed_image_is_a_one_line_error(tmp_path, monkeypatch, change, message):
    d, _ = prepared(tmp_path, monkeypatch)
    change(Path(d["path"]) / "class0" / "img000.jpg")
    images = stream.load(Stream.of(params_for(d, workers=1))).train_x          # the error comes back from a worker
    with pytest.raises(PipelineError, match=message) as err:
        images.tensor()
    assert "\n" not in str(err.value)


def test_a_corrupt_jpeg_is_an_error_when_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = image_folder(tmp_path / "images")
    (root / "class2" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"garbage" * 10)
    d = dict(DATA, path=str(root), val_fraction=0.5)
    man = stream.scan(d, 0)                            # listing reads no pixels
    split = "train" if any(p.endswith(b"broken.jpg") for p in man.paths["train"]) else "val"
    at = [i for i, p in enumerate(man.paths[split]) if p.endswith(b"broken.jpg")]
    images = stream.split_images(man, split, Stream.folder(d))[torch.tensor(at)]
    with pytest.raises(PipelineError, match="cannot read image .*broken.jpg"):
        images.tensor()


def test_format_resolution(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "images", extras=True)
    d = dict(DATA, path=str(root), format="auto")
    assert layout.data_format(dict(d, tensor_budget_gb=1)) == "tensor"
    assert layout.data_format(dict(d, tensor_budget_gb=24 * 3 * 16 * 16 / 2 ** 30 * 0.99)) == "stream"
    assert layout.data_format(dict(d, dataset="digits", format="stream")) == "tensor"
    with pytest.raises(PipelineError, match="data.format auto counts the images of data.path"):
        layout.data_format(dict(d, path=str(tmp_path / "nope")))
    monkeypatch.chdir(Path(__file__).parent.parent)
    params = config.load("imagenet", check_paths=False)
    assert layout.dataset_path(params) == layout.MANIFEST and layout.PIXELS not in layout.probe_weights(params)
