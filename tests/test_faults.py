"""Fault injection on the tiny study that tests/test_e2e_snakemake.py built (fixture `study`, conftest.py):

- every node type, run by hand as its rule runs it, is killed with SIGKILL at a random point after its
  outputs were removed (as Snakemake and DVC remove them before a rerun); whatever it left under its output
  names is complete (equal to the uninterrupted study's file), and a rerun ends with outputs identical to the
  study's (pre-training: the resumable state is picked up; weights bit-identical);
- a write that fails (a full disk, simulated in the write itself): a one-line error, the earlier output
  untouched, no temporary file left;
- two runs of the same node at once: the second fails at once with a one-line error, the first finishes.
Non-finite losses (tests/test_engine.py), corrupted and truncated files (tests/test_bad_input.py) and
preemption on Slurm (tests/test_slurm.py) are tested where their parts are.
"""
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("study")]   # after tests/test_e2e_snakemake.py
ENV = {"OMP_NUM_THREADS": "1"}            # as Snakemake ran the study's jobs (threads 1 at --cores 2)
VOLATILE = {"seconds", "wall_s", "images_per_s"}   # timings in a metrics.json: they differ between any two runs
S0 = "results/seed0"
# node type -> (CLI arguments after --preset tiny, its output files or folders, the rule's benchmark file)
NODES = {
    "prepare_data": ([], ["results/prepare_data"], "results/benchmarks/prepare_data.tsv"),
    "random_init": (["--seed", "0"], [f"{S0}/random_init"], f"{S0}/benchmarks/random_init.tsv"),
    "pretrain": (["--seed", "0", "--method", "rcmae"], [f"{S0}/pretrain/rcmae"], f"{S0}/benchmarks/pretrain/rcmae.tsv"),
    "supervised": (["--seed", "0"], [f"{S0}/supervised"], f"{S0}/benchmarks/supervised.tsv"),
    "teacher_swap": (["--seed", "0", "--stage", "mae_stage1"], [f"{S0}/teacher_swap/mae_stage1"],
                     f"{S0}/benchmarks/teacher_swap/mae_stage1.tsv"),
    "pretrain_dbot": (["--seed", "0", "--stage", "mae_stage1"], [f"{S0}/pretrain_dbot/mae_stage1"],
                      f"{S0}/benchmarks/pretrain_dbot/mae_stage1.tsv"),
    **{node: (["--seed", "0", "--weights", "bootmae"], [f"{S0}/{node}/bootmae"], f"{S0}/benchmarks/{node}/bootmae.tsv")
       for node in ("knn", "linprobe", "segprobe", "analyze")},
    **{node: (["--seed", "0", "--weights", "mae"], [f"{S0}/{node}/mae"], f"{S0}/benchmarks/{node}/mae.tsv")
       for node in ("finetune", "robustness")},
    "checkpoint_eval": (["--seed", "0", "--weights", "sdae"], [f"{S0}/checkpoint_eval/sdae"],
                        f"{S0}/benchmarks/checkpoint_eval/sdae.tsv"),
    "cka": (["--seed", "0"], [f"{S0}/cka"], f"{S0}/benchmarks/cka.tsv"),
    "report": ([], ["results/summary.csv", "results/summary.md", "results/plots", "results/swap_spread.csv"],
               "results/benchmarks/report.tsv"),
}


def files(root: Path, outputs: list[str]) -> list[Path]:
    out = []
    for name in outputs:
        p = root / name
        out += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
    return out


def digest(path: Path) -> str:
    """sha256 of a file; of a JSON file without its timing fields (and a params.yaml as is)."""
    data = path.read_bytes()
    if path.suffix == ".json":
        def strip(v):
            if isinstance(v, dict):
                return {k: strip(x) for k, x in v.items() if k not in VOLATILE}
            return [strip(x) for x in v] if isinstance(v, list) else v
        data = json.dumps(strip(json.loads(data)), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def node_argv(node: str) -> list[str]:
    return [sys.executable, "-m", f"pipeline.stages.{node}", "--preset", "tiny", *NODES[node][0]]


def remove_outputs(root: Path, outputs: list[str]) -> None:
    for f in files(root, outputs):
        f.unlink()


@pytest.mark.parametrize("node", list(NODES))
def test_sigkill_at_a_random_point_then_rerun_gives_the_studys_outputs(node, study, monkeypatch):
    monkeypatch.chdir(study)
    _, outputs, bench = NODES[node]
    if node == "report":        # its tables hold the training nodes' wall times, which the reruns above changed
        run_cli(*node_argv(node), env=ENV, timeout=600)
    reference = {f.relative_to(study): digest(f) for f in files(study, outputs)}
    assert reference, f"the study made no outputs for {node}"
    seconds = float((study / bench).read_text().splitlines()[1].split("\t")[0])   # its uninterrupted run
    rng = random.Random(f"{node}-{os.environ.get('FAULT_SEED', '0')}")
    delay = rng.uniform(0.4, 0.95) * seconds
    remove_outputs(study, outputs)
    proc = subprocess.Popen(node_argv(node), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, **ENV), start_new_session=True)
    try:
        proc.wait(timeout=delay)
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = True
    left = {f.relative_to(study): digest(f) for f in files(study, outputs)}
    partial = sorted(str(name) for name, h in left.items() if reference.get(name) != h)
    assert not partial, f"{node}: outputs unlike the study's after SIGKILL: {partial}"
    run_cli(*node_argv(node), env=ENV, timeout=600)
    again = {f.relative_to(study): digest(f) for f in files(study, outputs)}
    differ = sorted(str(name) for name in again.keys() | reference.keys() if again.get(name) != reference.get(name))
    assert not differ, f"{node} (killed: {killed}, after {delay:.1f} s of ~{seconds:.0f} s): outputs differ: {differ}"


def test_a_failed_write_keeps_the_earlier_output_and_no_temporary(study, monkeypatch, capsys):
    """The disk fills up while knn writes its metrics: one line, the earlier metrics.json as it was."""
    from pipeline import checkpoint
    from pipeline.stages import knn

    monkeypatch.chdir(study)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{study}/mlflow.db")
    metrics = study / f"{S0}/knn/mae/metrics.json"
    before = metrics.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.os, "fsync", full_disk)
    with pytest.raises(SystemExit) as stop:
        knn.main(["--preset", "tiny", "--weights", "mae"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert metrics.read_bytes() == before
    assert not [p for p in metrics.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_second_run_of_a_running_node_fails_at_once(study, monkeypatch, capsys):
    """The first run is a process; the second is started (in this process, so at once) while the first holds
    the node's lock: it stops with one line, and the first ends normally with the study's outputs."""
    from pipeline.stages import linprobe

    monkeypatch.chdir(study)
    outputs = NODES["linprobe"][1]
    reference = {f: digest(f) for f in files(study, outputs)}
    first = subprocess.Popen(node_argv("linprobe"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, **ENV))
    lock = study / "results/.locks/linprobe@seed0-bootmae.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        time.sleep(0.01)
    with pytest.raises(SystemExit) as stop:
        linprobe.main(["--preset", "tiny", *NODES["linprobe"][0]])
    out = first.communicate(timeout=600)[0]
    assert stop.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: linprobe@seed0-bootmae is already running (pid {first.pid}); "
        "wait for it to finish or stop it, then run it again")
    assert first.returncode == 0, out[-2000:]
    assert {f: digest(f) for f in files(study, outputs)} == reference
