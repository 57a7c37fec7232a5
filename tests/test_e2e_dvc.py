"""The tiny study through real `dvc repro` in a temporary git repository: a param edit reruns exactly
the stages it reaches."""
import re

import pytest

from conftest import run_cli

pytestmark = pytest.mark.e2e


def repro(*args) -> set[str]:
    out = run_cli("dvc", "repro", *args).stdout
    return set(re.findall(r"Running stage '([^']+)'", out))


def edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_dvc_repro_reruns_only_what_a_param_edit_reaches(workdir):
    """On the tiny preset, the random-teacher dBOT chain and MAE's evaluations (a subset of the DAG, to keep
    the test short: dvc repro runs one stage at a time; tests/test_dag.py checks the whole DAG's commands)."""
    edit(workdir / "dvc.yaml", "  - preset: default", "  - preset: tiny")
    run_cli("git", "init", "-q")
    run_cli("dvc", "init", "-q")
    targets = ["knn@dbot_random_stage2", "linprobe@dbot_random_stage2", "linprobe@mae"]
    first = repro(*targets)
    assert first == {"prepare_data", "random_init", "pretrain@mae", "linprobe@mae"} | {
        f"{node}@random_stage{k}" for node in ("teacher_swap", "pretrain_dbot") for k in range(3)} | {
        "knn@dbot_random_stage2", "linprobe@dbot_random_stage2"}
    assert "up to date" in run_cli("dvc", "status", *targets).stdout.lower()

    edit(workdir / "params/base.yaml", "  lr: 0.1 ", "  lr: 0.05 ")
    assert repro(*targets) == {"linprobe@dbot_random_stage2", "linprobe@mae"}

    edit(workdir / "params/base.yaml", "stage1: {epochs: 4, blr: 1.5e-3}", "stage1: {epochs: 4, blr: 3.0e-3}")
    assert repro(*targets) == {"pretrain_dbot@random_stage1", "teacher_swap@random_stage2",
                               "pretrain_dbot@random_stage2", "knn@dbot_random_stage2", "linprobe@dbot_random_stage2"}
    metrics = run_cli("dvc", "metrics", "show").stdout
    assert "results/knn/dbot_random_stage2/metrics.json" in metrics
