"""The tiny study through real `dvc repro` in a temporary git repository: a param edit reruns exactly
the stages it reaches."""
import re
import sys

import pytest

from conftest import run_cli

pytestmark = pytest.mark.e2e


def repro(*args, warm=True) -> set[str]:
    """The stages `dvc repro` ran; warm: under `python -m pipeline.orchestration.forkserver run --`, as docs/running.md shows
    (else cold: no fork server, not even the tests' own)."""
    prefix = [sys.executable, "-m", "pipeline.orchestration.forkserver", "run", "--"] if warm else []
    out = run_cli(*prefix, "dvc", "repro", *args, env=None if warm else {"MIM_FORKSERVER": ""}).stdout
    return set(re.findall(r"Running stage '([^']+)'", out))


def edit(path, pattern, new):
    """Replace the first match of the regex `pattern` in the file by `new` (which may use its groups)."""
    text = path.read_text()
    assert re.search(pattern, text), pattern
    path.write_text(re.sub(pattern, new, text, count=1))


def test_dvc_repro_reruns_only_what_a_param_edit_reaches(workdir):
    """On the tiny preset, the random-teacher dBOT chain and MAE's evaluations (a subset of the DAG, to keep
    the test short: dvc repro runs one stage at a time; tests/test_dag.py checks the whole DAG's commands)."""
    from pipeline.orchestration import dvc_yaml

    (workdir / "dvc.yaml").write_text(dvc_yaml.render("tiny"))        # its lists (e.g. kept checkpoints) follow the preset
    run_cli("git", "init", "-q")
    run_cli("dvc", "init", "-q")
    targets = ["knn@seed0-dbot_random_stage2", "linprobe@seed0-dbot_random_stage2", "linprobe@seed0-mae"]
    first = repro(*targets)
    assert first == {"prepare_data", "random_init@seed0", "pretrain@seed0-mae", "linprobe@seed0-mae"} | {
        f"{node}@seed0-random_stage{k}" for node in ("teacher_swap", "pretrain_dbot") for k in range(3)} | {
        "knn@seed0-dbot_random_stage2", "linprobe@seed0-dbot_random_stage2"}
    assert "up to date" in run_cli("dvc", "status", *targets).stdout.lower()

    edit(workdir / "params/base.yaml", r"  lr: 0\.1 ", "  lr: 0.05 ")
    assert repro(*targets, warm=False) == {"linprobe@seed0-dbot_random_stage2", "linprobe@seed0-mae"}

    edit(workdir / "params/base.yaml", r"stage1: \{epochs: (\d+), blr: 1\.5e-3\}", r"stage1: {epochs: \1, blr: 3.0e-3}")
    assert repro(*targets) == {"pretrain_dbot@seed0-random_stage1", "teacher_swap@seed0-random_stage2",
                               "pretrain_dbot@seed0-random_stage2", "knn@seed0-dbot_random_stage2", "linprobe@seed0-dbot_random_stage2"}
    metrics = run_cli("dvc", "metrics", "show").stdout
    assert "results/seed0/knn/dbot_random_stage2/metrics.json" in metrics
    run_cli("dvc", "plots", "show", "-o", "dvc_plots")                 # the pictures, declared as DVC plots
    page = (workdir / "dvc_plots/index.html").read_text()
    for picture in ("pretrain/mae/reconstruction.png", "pretrain_dbot/random_stage1/reconstruction.png"):
        assert picture.replace("/", "_") in page or picture in page, picture
