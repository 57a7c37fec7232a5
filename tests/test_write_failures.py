"""Writes that fail leave the last good state (issue 25, item 3): a pre-training node whose process may no longer
write files past a size (RLIMIT_FSIZE lowered in the running node's own process with prlimit; Python ignores
SIGXFSZ, so the write fails with EFBIG, as on a full disk or a quota) while it saves its resumable state, or a kept
encoder before it, ends with one line that names the file and the cause (exit 2); its last saved state is the same
file as before and loads; the same command, without the limit, resumes from it and ends."""
import hashlib
import resource
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_cli

from pipeline.checkpoint import load_tensors

pytestmark = pytest.mark.e2e
# a wider encoder than tiny's, so that its files (~3 MB encoder, ~10 MB state) are far larger than everything else
# the node writes (params.yaml, the ~1 MB MLflow database): the limit hits them and nothing else; 3 epochs, so that
# epoch 2 keeps an encoder (checkpoints/epoch2) before it saves the state
ARGS = ["--preset", "tiny", "--set", "pretrain.epochs=3", "--set", "model.embed_dim=128", "--set", "model.depth=4",
        "--set", "model.num_heads=4"]
NODE = [sys.executable, "-m", "pipeline.stages.training.pretrain", "--method", "mae", *ARGS]
STEPS_PER_EPOCH = 11
RESUME = "results/.resume/pretrain@seed0-mae"


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def limited(workdir, limit, after_step: int | None) -> tuple[subprocess.CompletedProcess, dict]:
    """The node as a process whose file size limit drops to limit(state bytes, kept encoder bytes) once its saved
    state has reached after_step (None: as soon as it runs); its own process is the one holding the node's lock (it
    may be a fork server's child). Also returns the sha256 of the state and the kept encoder when the limit fell."""
    proc = subprocess.Popen(NODE, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock, deadline = workdir / "results/.locks/pretrain@seed0-mae.lock", time.time() + 300
    state, kept = workdir / RESUME / "state.pt", workdir / RESUME / "checkpoints/epoch1.safetensors"
    before = {}
    while time.time() < deadline and proc.poll() is None:
        try:
            pid = int(lock.read_text())
            if after_step is None or torch.load(state, weights_only=True)["step"] >= after_step:
                before = {p: sha(p) for p in (state, kept)}
                max_bytes = limit(state.stat().st_size, kept.stat().st_size)
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (max_bytes, resource.RLIM_INFINITY))
                break
        except (OSError, ValueError, RuntimeError, KeyError):
            pass
        time.sleep(0.02)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(NODE, proc.returncode, out, err), before


def test_a_failed_save_keeps_the_last_good_state_and_the_node_resumes_from_it(workdir):
    run_cli(sys.executable, "-m", "pipeline.stages.training.prepare_data", *ARGS)
    state, kept = workdir / RESUME / "state.pt", workdir / RESUME / "checkpoints/epoch1.safetensors"
    cases = (  # (the limit, when it falls, the file whose save fails)
        # after the first epoch's save: epoch 2 keeps its encoder, then fails to save its state
        (lambda state_bytes, kept_bytes: state_bytes // 2 + kept_bytes, STEPS_PER_EPOCH, state),
        # from the start of a resumed run: epoch 2 fails to keep its encoder
        (lambda state_bytes, kept_bytes: kept_bytes // 2, None, workdir / RESUME / "checkpoints/epoch2.safetensors"))
    for limit, after_step, failed in cases:
        proc, before = limited(workdir, limit, after_step)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert errors == [f"error: pretrain@seed0-mae: File too large ({failed.relative_to(workdir)}); "
                          "no output was replaced"], proc.stderr[-3000:]
        assert {p: sha(p) for p in (state, kept)} == before                    # the last good state, as it was
        assert torch.load(state, weights_only=True)["step"] == STEPS_PER_EPOCH
        assert not [p for p in (workdir / RESUME).rglob("*.tmp")]
        assert not (workdir / "results/seed0/pretrain/mae/encoder.safetensors").exists()

    proc = run_cli(*NODE)                                                       # no limit: the same command
    assert f"resuming {RESUME}/state.pt at step {STEPS_PER_EPOCH}" in proc.stderr
    tensors, meta = load_tensors(workdir / "results/seed0/pretrain/mae/encoder.safetensors")
    assert tensors and meta["node"] == "pretrain"
