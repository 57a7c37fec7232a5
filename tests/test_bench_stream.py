"""The stream benchmark (pipeline.bench.stream): its synthetic JPEGs, its targets and pages, and a tiny real run
(well-formed outputs; no speed or memory thresholds: those are measured, never tested)."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.bench import render, stream, synthetic


def test_make_jpegs_is_seeded_and_photo_like(tmp_path):
    a, b = synthetic.make_jpegs(tmp_path / "a", 12), synthetic.make_jpegs(tmp_path / "b", 12)
    files = [p.relative_to(a) for p in synthetic.image_files(a)]
    assert len(files) == 12 and len({f.parent for f in files}) == stream.CLASSES
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert synthetic.make_jpegs(tmp_path / "c", 12, seed=1) and \
        (tmp_path / "c" / files[0]).read_bytes() != (a / files[0]).read_bytes()
    (w0, h0), jitter = synthetic.JPEG_SIZE, synthetic.JPEG_JITTER
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
    files = synthetic.image_files(synthetic.make_jpegs(tmp_path / "made", 10))
    root = synthetic.link_folder(files, tmp_path / "linked", 25)
    linked = synthetic.image_files(root)
    assert len(linked) == 25 and {p.parent.name for p in linked} == {p.parent.name for p in files}
    assert all(p.read_bytes() == files[int(p.stem) % 10].read_bytes() for p in linked)


def stream_result(rate=400.0, rss=(900.0, 920.0), startup=(8.0, 8.3)) -> dict:
    rows = [{"images": n, "train_images": n * 4 // 5, "peak_rss_mb": r, "peak_pss_mb": r / 2,
             "main_peak_rss_mb": r / 1.5,
             "processes": 2, "startup_s": s, "first_work_s": 0.3, "step_s": 0.4, "prepare_s": 12.0,
             "prepare_peak_rss_mb": 800.0} for n, r, s in zip((10000, 40000), rss, startup)]
    result = {"machine": {"model": "AMD EPYC", "cores": 2, "cpu_capability": "AVX2", "cpu": "AMD EPYC, AVX2",
                          "load_average": [0.1, 0.2, 0.3]}, "torch": "2", "torchvision": "0", "img_size": 224,
              "batch_size": 64, "crop_scale": [0.5, 1.0], "source": "3 JPEGs",
              "jpeg": {"mean_width": 400, "mean_height": 350, "mean_kb": 60}, "images_per_s_per_worker": rate,
              "decode": {"count": 100, "decode_images_per_s": 2 * rate}, "workers": [1, 2],
              "loader": [{"workers": k, "images_per_s": k * rate, "images_per_s_per_worker": rate, "first_batch_s": 1.0}
                         for k in (1, 2)], "stats_images": 2048, "node": {"steps": 5, "data_workers": 1},
              "by_images": rows, "notes": "links"}
    result["targets"] = stream.stream_targets(result)
    return result


def test_stream_targets_met():
    result = stream_result()
    assert {k: t["met"] for k, t in result["targets"].items()} == \
        {"decode_rate": True, "memory_flat": True, "startup_flat": True}
    md = re.sub(r" +", " ", render.stream_markdown(result))   # table cells padded to their column's width
    assert "NOT met" not in md and md.count(": met (") == 3
    assert "| 2 | 800 | 400 | 1.00 |" in md and "| 40000 | 32000 | 920 | 460 |" in md and "AVX2" in md


@pytest.mark.parametrize("change, missed", [({"rate": 120.0}, "decode_rate"), ({"rss": (900.0, 1100.0)}, "memory_flat"),
                                            ({"startup": (8.0, 10.5)}, "startup_flat")])
def test_stream_targets_not_met(change, missed):
    result = stream_result(**change)
    assert [k for k, t in result["targets"].items() if not t["met"]] == [missed]
    md = re.sub(r" +", " ", render.stream_markdown(result))   # table cells padded to their column's width
    assert md.count("**NOT met**") == 1
    line = {"decode_rate": "images/s per worker", "memory_flat": "memory flat", "startup_flat": "start-up independent"}
    assert line[missed] in next(ln for ln in md.splitlines() if "NOT met" in ln)


def test_stream_cli_tiny_run(workdir):
    result = stream.main(["--folder", "images", "--make", "40", "--img-size", "32", "--workers", "1",
                          "--images", "60", "--node-steps", "2", "--decode-images", "20", "--loader-steps", "3",
                          "--batch-size", "8", "--workdir", "work", "--out", "out/bench"])
    out = workdir / "out/bench"
    written = json.loads((out / "stream.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert len(synthetic.image_files(workdir / "images")) == 40
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
