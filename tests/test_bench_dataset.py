"""The dataset-memory benchmark on tiny folders (well-formed outputs; no memory or timing thresholds: those are
measured, never tested), and the streamed image-folder preparation: the same file and sidecar as reading every
image into memory, and nothing left behind by a failed or killed prepare."""
import json
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import layout
from pipeline.bench import dataset
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
    a, b = dataset.make_folder(tmp_path / "a", 25), dataset.make_folder(tmp_path / "b", 25)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 25 and len({f.parent for f in files}) == dataset.CLASSES
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert Image.open(a / files[0]).size == (dataset.GEN_SIZE, dataset.GEN_SIZE)


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
    root = dataset.make_folder(tmp_path / "images", 60)
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
    root = dataset.make_folder(workdir / "images", 40)
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
    root = dataset.make_folder(tmp_path / "images", 40)
    scratch = tmp_path / "scratch"
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_PREPARE, str(root), str(scratch)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert scratch.is_dir() and list(scratch.iterdir()) == []


# ---- the stream benchmark (--stream) --------------------------------------------------------------------------

def test_make_jpegs_is_seeded_and_photo_like(tmp_path):
    a, b = dataset.make_jpegs(tmp_path / "a", 12), dataset.make_jpegs(tmp_path / "b", 12)
    files = [p.relative_to(a) for p in dataset.image_files(a)]
    assert len(files) == 12 and len({f.parent for f in files}) == dataset.CLASSES
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert dataset.make_jpegs(tmp_path / "c", 12, seed=1) and \
        (tmp_path / "c" / files[0]).read_bytes() != (a / files[0]).read_bytes()
    (w0, h0), jitter = dataset.JPEG_SIZE, dataset.JPEG_JITTER
    sizes = set()
    for f in files:
        with Image.open(a / f) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            im.load()                                      # decodes: a valid JPEG
            w, h = im.size
            assert (w0 * (1 - jitter) - 1 <= w <= w0 * (1 + jitter) + 1
                    and h0 * (1 - jitter) - 1 <= h <= h0 * (1 + jitter) + 1)
            assert torch.from_numpy(np.asarray(im, dtype=np.float32)).std() > 20     # not a flat colour
            sizes.add(im.size)
    assert len(sizes) > 6                                  # the sizes vary


def test_link_folder_gives_distinct_paths(tmp_path):
    files = dataset.image_files(dataset.make_jpegs(tmp_path / "made", 10))
    root = dataset.link_folder(files, tmp_path / "linked", 25)
    linked = dataset.image_files(root)
    assert len(linked) == 25 and {p.parent.name for p in linked} == {p.parent.name for p in files}
    assert all(p.read_bytes() == files[int(p.stem) % 10].read_bytes() for p in linked)


def stream_result(rate=400.0, rss=(900.0, 920.0), startup=(8.0, 8.3)) -> dict:
    rows = [{"images": n, "train_images": n * 4 // 5, "peak_rss_mb": r, "peak_pss_mb": r / 2,
             "main_peak_rss_mb": r / 1.5,
             "processes": 2, "startup_s": s, "first_work_s": 0.3, "step_s": 0.4, "prepare_s": 12.0,
             "prepare_peak_rss_mb": 800.0} for n, r, s in zip((10000, 40000), rss, startup)]
    result = {"machine": {"cpu_model": "AMD EPYC", "cores": 2, "cpu_capability": "AVX2", "cpu": "AMD EPYC, AVX2",
                          "load_average": [0.1, 0.2, 0.3]}, "torch": "2", "torchvision": "0", "img_size": 224,
              "batch_size": 64, "crop_scale": [0.5, 1.0], "source": "3 JPEGs",
              "jpeg": {"mean_width": 400, "mean_height": 350, "mean_kb": 60}, "images_per_s_per_worker": rate,
              "decode": {"count": 100, "decode_images_per_s": 2 * rate}, "workers": [1, 2],
              "loader": [{"workers": k, "images_per_s": k * rate, "images_per_s_per_worker": rate, "first_batch_s": 1.0}
                         for k in (1, 2)], "stats_images": 2048, "node": {"steps": 5, "data_workers": 1},
              "by_images": rows, "notes": "links"}
    result["targets"] = dataset.stream_targets(result)
    return result


def test_stream_targets_met():
    result = stream_result()
    assert {k: t["met"] for k, t in result["targets"].items()} == \
        {"decode_rate": True, "memory_flat": True, "startup_flat": True}
    md = re.sub(r" +", " ", dataset.stream_markdown(result))   # table cells padded to their column's width
    assert "NOT met" not in md and md.count(": met (") == 3
    assert "| 2 | 800 | 400 | 1.00 |" in md and "| 40000 | 32000 | 920 | 460 |" in md and "AVX2" in md


@pytest.mark.parametrize("change, missed", [({"rate": 120.0}, "decode_rate"), ({"rss": (900.0, 1100.0)}, "memory_flat"),
                                            ({"startup": (8.0, 10.5)}, "startup_flat")])
def test_stream_targets_not_met(change, missed):
    result = stream_result(**change)
    assert [k for k, t in result["targets"].items() if not t["met"]] == [missed]
    md = re.sub(r" +", " ", dataset.stream_markdown(result))   # table cells padded to their column's width
    assert md.count("**NOT met**") == 1
    line = {"decode_rate": "images/s per worker", "memory_flat": "memory flat", "startup_flat": "start-up independent"}
    assert line[missed] in next(ln for ln in md.splitlines() if "NOT met" in ln)


def test_stream_cli_tiny_run(workdir):
    result = dataset.main(["--stream", "--folder", "images", "--make", "40", "--img-size", "32", "--workers", "1",
                                 "--images", "60", "--node-steps", "2", "--decode-images", "20", "--loader-steps", "3",
                                 "--batch-size", "8", "--workdir", "work", "--out", "out/bench"])
    out = workdir / "out/bench"
    written = json.loads((out / "stream.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert len(dataset.image_files(workdir / "images")) == 40
    assert written["img_size"] == 32 and written["workers"] == [1] and written["images_per_s_per_worker"] > 0
    assert written["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert [r["workers"] for r in written["loader"]] == [1] and written["loader"][0]["images_per_s"] > 0
    [row] = written["by_images"]
    assert row["images"] == 60 and row["train_images"] + row["val_images"] == 60
    assert row["peak_rss_mb"] > row["main_peak_rss_mb"] > 0 and row["processes"] == 2      # the node and its worker
    assert 0 < row["first_work_s"] < row["startup_s"] and row["steps"] == 2
    assert written["targets"]["memory_flat"]["met"] is None and "not measured" in (out / "stream.md").read_text()
    assert (out / "stream.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (workdir / "work/images_60").exists() and not (workdir / "results/bench").exists()
