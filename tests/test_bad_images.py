"""data.bad_images (issue 25, item 2): unreadable images of a streamed folder (pipeline/data/stream.py) stop the node
in one line (stop), or are replaced by the next readable image of their split, counted and named (skip), up to
data.max_bad_images. Real files: a truncated JPEG, an empty file and a text file named .jpg are unreadable; a CMYK
JPEG decodes and is not counted. The node-level check (metrics.json, MLflow, exit status):
test_node_skips_and_names_them.
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli
from PIL import Image
from test_stream import DATA, image_folder, params_for

from pipeline import layout
from pipeline.data import stream
from pipeline.data.steps import batch_indices
from pipeline.errors import PipelineError
from pipeline.settings import Loader, Stream

BAD = ["class0/notes.jpg", "class0/truncated.jpg", "class1/empty.jpg"]


def bad_folder(root: Path) -> Path:
    image_folder(root, classes=2, per_class=10, extras=False)
    good = (root / "class0" / "img000.jpg").read_bytes()
    (root / "class0" / "truncated.jpg").write_bytes(good[:len(good) // 2])
    (root / "class1" / "empty.jpg").write_bytes(b"")
    (root / "class0" / "notes.jpg").write_text("a text file someone named .jpg\n")
    Image.new("CMYK", (48, 40), (0, 128, 255, 30)).save(root / "class1" / "cmyk.jpg", "JPEG", quality=90)
    return root


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """(data params, manifest) of the folder with bad files; this process's count of bad images starts empty."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stream, "_bad", {})
    d = dict(DATA, path=str(bad_folder(tmp_path / "images")), val_fraction=0.2, bad_images="stop",
             max_bad_images=None)
    return d, stream.scan(d, 0)


def where(man, name: str) -> tuple[str, int]:
    for split in ("train", "val"):
        for i, p in enumerate(man.paths[split]):
            if p.decode() == name:
                return split, i
    raise KeyError(name)


def test_stop_names_the_file_in_one_line_and_cmyk_decodes(folder):
    d, man = folder
    for name in BAD:
        split, i = where(man, name)
        with pytest.raises(PipelineError, match=f"cannot read image .*{name}") as err:
            stream.split_images(man, split, Stream.folder(d, Loader(workers=1)))[torch.tensor([i])].tensor()
        assert "\n" not in str(err.value)
    split, i = where(man, "class1/cmyk.jpg")
    x = stream.split_images(man, split, Stream.folder(d))[torch.tensor([i])].tensor()
    assert x.shape == (1, 3, 16, 16) and x.float().std() > 0            # an RGB image, not a blank stand-in
    assert stream.bad_images() == []


@pytest.mark.parametrize("workers", [0, 1])
def test_stop_names_a_file_whose_name_looks_like_an_error_in_full(tmp_path, workers):
    """The one-line error is the decoder's own message, whether a worker process raised it (the DataLoader re-raises
    it with the worker's traceback) or this one: a file named like an exception's prefix is named in full."""
    name = "class0/PipelineError: UnreadableImage: odd.jpg"
    d = dict(DATA, path=str(image_folder(tmp_path / "images", classes=2, per_class=6, extras=False)), val_fraction=0.2)
    (tmp_path / "images" / name).write_bytes(b"")
    man = stream.scan(d, 0)
    split, i = where(man, name)
    with pytest.raises(PipelineError) as err:
        stream.split_images(man, split, Stream.folder(d, Loader(workers=workers)))[torch.tensor([i])].tensor()
    assert str(err.value).startswith(f"cannot read image {tmp_path / 'images' / name}: ") and "\n" not in str(err.value)


def test_skip_replaces_each_by_the_next_readable_image_and_names_it(folder):
    d, man = folder
    d = dict(d, bad_images="skip")
    for split in ("train", "val"):
        images = stream.split_images(man, split, Stream.folder(d, Loader(workers=2)))
        x = images.tensor()
        for i, p in enumerate(man.paths[split]):
            if p.decode() in BAD:                  # the next readable one of the split
                j = next(k % len(x) for k in range(i + 1, i + len(x))
                         if man.paths[split][k % len(x)].decode() not in BAD)
                assert torch.equal(x[i], x[j]), p
    assert stream.bad_images() == BAD and "class1/cmyk.jpg" not in stream.bad_images()
    assert stream.bad_record(["class0/earlier.jpg"])["bad_images"]["count"] == 4


def test_skip_is_deterministic_across_workers_and_resume(folder):
    d, man = folder
    d = dict(d, bad_images="skip")
    layout.MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    stream.save_manifest(man, layout.MANIFEST, {"mean": [0.5] * 3, "std": [0.2] * 3})
    runs = {}
    for workers, start in ((0, 0), (2, 0), (1, 3)):
        images = stream.load(Stream.of(dict(params_for(d, workers), data=d))).train_x
        runs[workers, start] = [x for x, _ in images.train_batches(batch_indices, 8, 7, slice(None), start, 6)]
    a, b, resumed = runs[0, 0], runs[2, 0], runs[1, 3]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and all(torch.equal(x, y) for x, y in zip(a[3:], resumed))
    assert set(stream.bad_images()) <= set(BAD) and stream.bad_images()


def test_more_than_the_limit_stop_in_one_line(folder):
    d, man = folder
    d = dict(d, bad_images="skip", max_bad_images=2)
    with pytest.raises(PipelineError) as err:
        for split in ("train", "val"):
            stream.split_images(man, split, Stream.folder(d, Loader(workers=1))).tensor()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"3 unreadable images in {d['path']}, more than "
                                                      "data.max_bad_images (2): class0/notes.jpg, ")
    assert "raise the limit" in message


def test_the_limit_counts_distinct_files_and_its_error_names_three_and_the_first_reason(monkeypatch):
    """count_bad, which every batch's skipped files go through: a file counts once, with its first reason (the rest of
    its line after the tab, whatever that holds); more than max_bad distinct files is one error naming the first
    three (sorted), ", ..." when there are more, and the first one's reason."""
    monkeypatch.setattr(stream, "_bad", {})
    files = SimpleNamespace(max_bad=2, root="/data")
    stream._Files.count_bad(files, ["b c/1.jpg\tnot an image\tat all\na/0.jpg\ttruncated", ""])
    stream._Files.count_bad(files, ["a/0.jpg\tanother reason"])                  # the same file: still 2
    assert stream._bad == {"b c/1.jpg": "not an image\tat all", "a/0.jpg": "truncated"}
    with pytest.raises(PipelineError) as err:
        stream._Files.count_bad(files, ["d/3.jpg\tempty"])
    assert str(err.value) == ("3 unreadable images in /data, more than data.max_bad_images (2): a/0.jpg, b c/1.jpg, "
                              "d/3.jpg (truncated); remove or replace them, or raise the limit")
    with pytest.raises(PipelineError) as err:
        stream._Files.count_bad(files, ["e/4.jpg\tempty"])
    assert "(2): a/0.jpg, b c/1.jpg, d/3.jpg, ... (truncated); remove" in str(err.value)


def test_the_record_and_its_log_name_every_file_once(monkeypatch, capsys):
    """bad_record: the files met here and those an earlier attempt met, once each, sorted, with their count ({} when
    none); log_bad_images: the count as MLflow metric, the names as tag (cut at MLflow's 5,000 characters), one note
    line naming the first five."""
    monkeypatch.setattr(stream, "_bad", {})
    logged = {}
    run = SimpleNamespace(log_metrics=lambda m: logged.update(metrics=m), set_tags=lambda t: logged.update(tags=t))
    assert stream.bad_record() == {}
    stream.log_bad_images(run, {})
    assert logged == {} and capsys.readouterr().err == ""
    stream._bad.update({f"c/{i}.jpg": "empty" for i in range(6)})
    names = ["b/9.jpg"] + [f"c/{i}.jpg" for i in range(6)]
    record = stream.bad_record(["c/0.jpg", "b/9.jpg"])
    assert record == {"bad_images": {"count": 7, "files": names}}
    stream.log_bad_images(run, record)
    assert logged == {"metrics": {"bad_images": 7}, "tags": {"bad_images": ", ".join(names)}}
    assert capsys.readouterr().err == ("note: 7 unreadable images skipped (data.bad_images: skip): "
                                       "b/9.jpg, c/0.jpg, c/1.jpg, c/2.jpg, c/3.jpg, ...\n")
    five = {"bad_images": {"count": 5, "files": names[:5]}}
    stream.log_bad_images(run, five)
    assert capsys.readouterr().err.endswith(": b/9.jpg, c/0.jpg, c/1.jpg, c/2.jpg, c/3.jpg\n")
    stream.log_bad_images(run, {"bad_images": {"count": 6, "files": names[:6]}})
    assert capsys.readouterr().err.endswith(": b/9.jpg, c/0.jpg, c/1.jpg, c/2.jpg, c/3.jpg, ...\n")
    long = [f"folder/{'x' * 50}{i:03d}.jpg" for i in range(100)]
    stream.log_bad_images(run, {"bad_images": {"count": 100, "files": long}})
    assert logged["tags"]["bad_images"] == ", ".join(long)[:5000] and len(logged["tags"]["bad_images"]) == 5000


@pytest.mark.e2e
def test_node_skips_and_names_them(workdir):
    """prepare_data and a pre-training node on the folder under skip: exit 0, the files named in metrics.json, in
    MLflow and in one note line; under stop the node ends in one error line (exit 2)."""
    from mlflow.tracking import MlflowClient

    root = bad_folder(workdir / "images")
    args = ["--preset", "tiny", "--set", "data.dataset=imagefolder", "--set", f"data.path={root}",
            "--set", "data.format=stream", "--set", "data.channels=3", "--set", "data.img_size=16",
            "--set", "model.patch_size=4", "--set", "pretrain.batch_size=8", "--set", "pretrain.epochs=1",
            "--set", "pretrain.keep_every_epochs=null", "--set", "launch.data_workers=1",
            "--set", "pretrain.online_knn.train_images=8", "--set", "pretrain.online_knn.val_images=4"]
    skip = [*args, "--set", "data.bad_images=skip"]
    prepared = run_cli(sys.executable, "-m", "pipeline.stages.training.prepare_data", *skip)
    sample = json.loads((workdir / "results/prepare_data/manifest.json").read_text())["bad_images"]["files"]
    assert sample and set(sample) <= set(BAD) and "unreadable images skipped" in prepared.stderr   # the stats sample
    proc = run_cli(sys.executable, "-m", "pipeline.stages.training.pretrain", "--method", "mae", *skip)
    metrics = json.loads((workdir / "results/seed0/pretrain/mae/metrics.json").read_text())
    train = metrics["bad_images"]["files"]         # those of the train split its 2 steps (16 images) met
    assert train and set(train) <= set(BAD) and metrics["bad_images"]["count"] == len(train)
    assert all(where(stream.read_manifest()[0], p)[0] == "train" for p in train)
    assert f"note: {len(train)} unreadable images skipped (data.bad_images: skip): {', '.join(train)}" in proc.stderr
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    run = client.search_runs([experiment], "tags.node = 'pretrain@seed0-mae'")[0]
    assert run.data.metrics["bad_images"] == len(train) and run.data.tags["bad_images"] == ", ".join(train)
    stop = run_cli(sys.executable, "-m", "pipeline.stages.training.pretrain", "--method", "mae", *args, check=False)
    errors = [line for line in stop.stderr.splitlines() if line.startswith("error:")]
    assert stop.returncode == 2 and "Traceback" not in stop.stderr and len(errors) == 1
    assert errors[0].startswith("error: cannot read image "), stop.stderr
