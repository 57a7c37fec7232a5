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
    edit(workdir / "dvc.yaml", "  - preset: default", "  - preset: tiny")
    run_cli("git", "init", "-q")
    run_cli("dvc", "init", "-q")
    first = repro()
    assert len(first) == 42 and "report" in first     # the whole DAG (tests/test_dag.py counts it)
    assert "up to date" in run_cli("dvc", "status").stdout.lower()

    edit(workdir / "params/base.yaml", "  lr: 0.1 ", "  lr: 0.05 ")
    weights = ["random_init", "mae", "sdae", "rcmae", "bootmae", "supervised", "dbot_stage0", "dbot_stage1",
               "dbot_stage2"]
    assert repro() == {f"linprobe@{w}" for w in weights} | {"report"}

    edit(workdir / "params/base.yaml", "stage1: {epochs: 10, blr: 1.5e-3}", "stage1: {epochs: 10, blr: 3.0e-3}")
    downstream = {f"{node}@dbot_stage{k}" for node in ("knn", "linprobe", "analyze") for k in (1, 2)}
    assert repro() == {"pretrain_dbot@stage1", "teacher_swap@stage2", "pretrain_dbot@stage2", "cka",
                       "report"} | downstream
    metrics = run_cli("dvc", "metrics", "show").stdout
    assert "results/knn/dbot_stage2/metrics.json" in metrics
