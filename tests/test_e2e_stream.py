"""A tiny streamed study through the real stage CLIs: prepare_data writes a manifest of a JPEG folder, a pre-training
node killed with SIGKILL mid-epoch and rerun (with another number of decoding workers) ends bit-identical to an
uninterrupted run, then knn and linprobe read the stream."""
import json
import os
import sys

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from test_e2e_resume import kill_mid_epoch
from test_stream import image_folder

from pipeline.dag import stage_module

pytestmark = pytest.mark.e2e
STEPS_PER_EPOCH = 9              # 144 train images / batch 16


def stream_args(root) -> list[str]:
    return ["--preset", "tiny", "--set", "data.dataset=imagefolder", "--set", f"data.path={root}",
            "--set", "data.format=stream", "--set", "data.channels=3", "--set", "data.img_size=16",
            "--set", "model.patch_size=4", "--set", "pretrain.batch_size=16", "--set", "pretrain.epochs=3",
            "--set", "pretrain.checkpoint_every_min=0", "--set", "pretrain.keep_every_epochs=null"]


def pretrain(args, workers: int) -> list[str]:
    return [sys.executable, "-m", "pipeline.stages.training.pretrain", "--method", "mae", *args,
            "--set", f"launch.data_workers={workers}"]


def test_streamed_study_resumes_bit_identically_and_evaluates(workdir):
    root = image_folder(workdir / "images", classes=3, per_class=60)
    args = stream_args(root)
    out = run_cli(sys.executable, "-m", "pipeline.stages.training.prepare_data", *args).stdout
    assert "144 train / 36 val images, 3 classes, 2 non-image files skipped" in out
    assert (workdir / "results/prepare_data/manifest.jsonl").is_file()
    assert not (workdir / "results/prepare_data/dataset.safetensors").exists()

    encoder = workdir / "results/seed0/pretrain/mae/encoder.safetensors"
    killed_at = kill_mid_epoch(workdir / "results/.resume/pretrain@seed0-mae/state.pt", STEPS_PER_EPOCH,
                               pretrain(args, workers=2))
    assert not encoder.exists()
    rerun = run_cli(*pretrain(args, workers=1))
    assert f"pretrain@seed0-mae/state.pt at step {killed_at}" in rerun.stderr, rerun.stderr[-2000:]
    resumed = load_file(encoder)
    os.rename(workdir / "results/seed0/pretrain", workdir / "results/seed0/pretrain_killed")
    run_cli(*pretrain(args, workers=0), env={"MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/other.db"})
    reference = load_file(encoder)
    assert killed_at > 0 and resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)

    for node in ("knn", "linprobe"):
        run_cli(sys.executable, "-m", stage_module(node), "--weights", "mae", *args)
        metrics = json.loads((workdir / f"results/seed0/{node}/mae/metrics.json").read_text())["metrics"]
        assert 0 <= metrics["top1"] <= 1
