"""Writes that fail leave the last good state (issue 25, item 3): a pre-training node whose process may not write
files past a size (RLIMIT_FSIZE lowered in the node's own process, SIGXFSZ ignored: the write fails with EFBIG, as
on a full disk or a quota) while it saves its resumable state, or a kept encoder before it, ends with one line that
names the file and the cause (exit 2); its last saved state is the same file as before and loads; the same command,
the limit lifted, resumes from it and ends."""
import hashlib
import os
import resource
import signal
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


def killed_after_first_epoch(workdir):
    """Run the node and SIGKILL it once its state of the first epoch is saved."""
    proc = subprocess.Popen(NODE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir)
    state, deadline = workdir / RESUME / "state.pt", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if torch.load(state, weights_only=True)["step"] >= STEPS_PER_EPOCH:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
        except Exception:
            pass
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the node ended before its first epoch's state could be seen")


def limited(workdir, max_bytes: int) -> subprocess.CompletedProcess:
    """The node as a process that may write no file past max_bytes (started cold: the limit is its own)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.RLIM_INFINITY))

    env = dict(os.environ, MIM_FORKSERVER="")
    return subprocess.run(NODE, cwd=workdir, env=env, capture_output=True, text=True, preexec_fn=limit, timeout=600)


def test_a_failed_save_keeps_the_last_good_state_and_the_node_resumes_from_it(workdir):
    run_cli(sys.executable, "-m", "pipeline.stages.training.prepare_data", *ARGS)
    killed_after_first_epoch(workdir)
    state, kept = workdir / RESUME / "state.pt", workdir / RESUME / "checkpoints/epoch1.safetensors"
    step = torch.load(state, weights_only=True)["step"]
    before = {p: sha(p) for p in (state, kept)}
    assert step == STEPS_PER_EPOCH and state.stat().st_size > 2 * kept.stat().st_size

    for max_bytes, failed in ((state.stat().st_size // 2 + kept.stat().st_size, state),     # the state's save
                              (kept.stat().st_size // 2, workdir / RESUME / "checkpoints/epoch2.safetensors")):
        proc = limited(workdir, max_bytes)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert errors == [f"error: pretrain@seed0-mae: File too large ({failed.relative_to(workdir)}); "
                          "no output was replaced"], proc.stderr[-3000:]
        assert {p: sha(p) for p in (state, kept)} == before                    # the last good state, as it was
        assert torch.load(state, weights_only=True)["step"] == step
        assert not [p for p in (workdir / RESUME).rglob("*.tmp")]
        assert not (workdir / "results/seed0/pretrain/mae/encoder.safetensors").exists()

    proc = run_cli(*NODE)                                                       # the limit lifted: the same command
    assert f"resuming {RESUME}/state.pt at step {step}" in proc.stderr
    tensors, meta = load_tensors(workdir / "results/seed0/pretrain/mae/encoder.safetensors")
    assert tensors and meta["node"] == "pretrain"
