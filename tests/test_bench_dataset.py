"""The dataset-memory benchmark on tiny folders (well-formed outputs; no memory or timing thresholds: those are
measured, never tested), and the streamed image-folder preparation: the same file and sidecar as reading every
image into memory, and nothing left behind by a failed or killed prepare."""
import json
import re
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pipeline import layout
from pipeline.bench import dataset, synthetic
from pipeline.data import datasets, folders
from pipeline.errors import PipelineError
from pipeline.stages.training import prepare_data

ROW_KEYS = {"images", "train_images", "val_images", "file_mb", "raw_mb", "baseline_anon_mb", "baseline_file_mb",
            "generate_s", "prepare_peak_anon_mb", "prepare_peak_file_mb", "prepare_s", "train_peak_anon_mb",
            "train_peak_file_mb", "train_s", "device"}


def test_cli_writes_well_formed_results(workdir):
    result = dataset.main(["--sizes", "40", "80", "--preset", "tiny", "--img-size", "28", "--train-steps", "1",
                                 "--threads", "1", "--workdir", "work", "--out", "out/bench"])
    out = workdir / "out/bench"
    written = json.loads((out / "dataset_memory.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert (written["preset"], written["img_size"], written["channels"], written["threads"]) == ("tiny", 28, 1, 1)
    assert [r["images"] for r in written["rows"]] == [40, 80]
    for row in written["rows"]:
        assert ROW_KEYS <= set(row), row
        assert all(row[k] > 0 for k in ROW_KEYS - {"device"}), row
        assert row["train_images"] + row["val_images"] == row["images"] and row["val_images"] > 0
        assert row["file_mb"] * 2 ** 20 > row["images"] * 28 * 28     # the pixels plus header and labels
    assert sorted(p.name for p in (workdir / "work").iterdir()) == ["images_40", "images_80"]   # prepared: removed
    assert len(list((workdir / "work/images_80").rglob("*.png"))) == 80
    md = re.sub(r" +", " ", (out / "dataset_memory.md").read_text())   # table cells padded to their column's width
    assert "| 40 | 30 / 10 |" in md and "| 80 | 60 / 20 |" in md and "flat beyond" in md
    assert (out / "dataset_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (workdir / "results/bench").exists()                    # --out is honoured


def test_make_folder_is_seeded(tmp_path):
    a, b = synthetic.make_folder(tmp_path / "a", 25), synthetic.make_folder(tmp_path / "b", 25)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 25 and len({f.parent for f in files}) == synthetic.CLASSES
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert Image.open(a / files[0]).size == (synthetic.GEN_SIZE, synthetic.GEN_SIZE)


# ---- streamed preparation -----------------------------------------------------------------------------------

def cfg(path, channels=1):
    return {"dataset": "imagefolder", "path": str(path), "img_size": 12, "channels": channels, "val_fraction": 0.2}


def mapping(t: torch.Tensor) -> str:
    """The /proc/self/maps line of the memory that holds t (Linux)."""
    ptr = t.untyped_storage().data_ptr()
    for line in open("/proc/self/maps").read().splitlines():
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        if lo <= ptr < hi:
            return line
    raise AssertionError(f"no mapping holds {ptr:#x}")


def in_memory(d: dict, seed: int) -> datasets.Prepared:
    """The image folder read as before streaming: every image stacked in memory, the same helpers."""
    train, val = folders.split_folder(folders.data_folder(d), d["val_fraction"], seed)
    mode = "L" if d["channels"] == 1 else "RGB"

    def read(classes):
        pairs = [(label, f) for label, files in enumerate(classes.values()) for f in files]
        x = torch.stack([folders._read_image(f, mode, d["img_size"]) for _, f in pairs])
        return x, torch.tensor([label for label, _ in pairs])
    (tx, ty), (vx, vy) = read(train), read(val)
    return datasets.Prepared(tx, ty, vx, vy, list(train), *datasets.tensor_channel_stats(tx),
                         f"imagefolder {d['path']} ({len(train)} classes)")


@pytest.mark.parametrize("channels", [1, 3])
def test_streamed_prepare_equals_in_memory(tmp_path, channels):
    root = synthetic.make_folder(tmp_path / "images", 60)
    scratch = tmp_path / "scratch"
    streamed = datasets.prepare(cfg(root, channels), seed=0, scratch=scratch)
    assert list(scratch.iterdir()) == []                   # the temporary image file has no name
    assert str(scratch) in mapping(streamed.train_x) and mapping(streamed.train_x).endswith("(deleted)")
    reference = in_memory(cfg(root, channels), seed=0)
    a = datasets.save_prepared(streamed, tmp_path / "a" / "dataset.safetensors", {"node": "prepare_data"})
    b = datasets.save_prepared(reference, tmp_path / "b" / "dataset.safetensors", {"node": "prepare_data"})
    assert a == b and a["counts"] == {"train": 50, "val": 10} and a["class_counts"]["val"] == [1] * 10
    assert (tmp_path / "a/dataset.safetensors").read_bytes() == (tmp_path / "b/dataset.safetensors").read_bytes()
    loaded = datasets.load_prepared(tmp_path / "a" / "dataset.safetensors")
    assert all(torch.equal(getattr(loaded, k), getattr(reference, k)) for k in datasets.TENSORS)


def test_channel_stats_in_place_gives_the_out_of_place_sums():
    x = torch.randint(0, 256, (4100, 2, 5, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    s, s2 = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for chunk in x.split(4096):                           # the computation before it was made in place
        c = chunk.double() / 255
        s, s2 = s + c.sum((0, 2, 3)), s2 + (c * c).sum((0, 2, 3))
    mean = s / (4100 * 15)
    std = (s2 / (4100 * 15) - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    assert datasets.tensor_channel_stats(x) == (mean.tolist(), std.tolist())


def test_corrupt_image_mid_folder_leaves_no_dataset(workdir, capsys):
    root = synthetic.make_folder(workdir / "images", 40)
    bad = root / "class3" / "0000013.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    argv = ["--preset", "tiny", "--set", "data.dataset=imagefolder", "--set", f"data.path={root}"]
    with pytest.raises(SystemExit) as exit_:
        prepare_data.main(argv)
    assert exit_.value.code == 2 and "cannot read image" in capsys.readouterr().err
    assert not layout.DATASET.exists() and list(layout.DATA_DIR.iterdir()) == []     # no temp file either
    with pytest.raises(PipelineError, match="cannot read image .*0000013.png"):
        datasets.prepare(cfg(root), seed=0, scratch=workdir / "scratch")
    assert list((workdir / "scratch").iterdir()) == []


KILLED_MID_PREPARE = """
import os, signal, sys
from pipeline.data import datasets, folders
read, calls = folders._read_image, []

def read_then_die(*args):
    calls.append(1)
    if len(calls) == 20:
        os.kill(os.getpid(), signal.SIGKILL)
    return read(*args)
folders._read_image = read_then_die
datasets.prepare({"dataset": "imagefolder", "path": sys.argv[1], "img_size": 12, "channels": 1, "val_fraction": 0.2},
             0, scratch=sys.argv[2])
"""


def test_killed_prepare_leaves_no_temp_file(tmp_path):
    root = synthetic.make_folder(tmp_path / "images", 40)
    scratch = tmp_path / "scratch"
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_PREPARE, str(root), str(scratch)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert scratch.is_dir() and list(scratch.iterdir()) == []
