"""The Snakefile and dvc.yaml describe the same nodes with the same commands; Snakemake lints clean."""
import re
import subprocess
from pathlib import Path

from dvc.repo import Repo

from conftest import ROOT, run_cli


def snakemake_commands(preset="default") -> set[tuple[str, str]]:
    proc = run_cli("snakemake", "--dry-run", "--printshellcmds", "--forceall", "--config", f"preset={preset}")
    out = proc.stdout + proc.stderr
    commands, rule = set(), None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line)
        if m:
            rule = m.group(1)
        elif line.startswith("Shell command: python"):
            commands.add((rule, line.removeprefix("Shell command: ").split(" > ")[0].strip()))
    return commands


def dvc_commands(workdir) -> set[tuple[str, str]]:
    run_cli("dvc", "init", "--no-scm", "-q")
    with Repo(str(workdir)) as repo:
        return {(stage.name.split("@")[0], stage.cmd) for stage in repo.index.stages}


def test_committed_dvc_yaml_is_the_generated_one():
    from pipeline import dvc_yaml

    assert Path("dvc.yaml").read_text() == dvc_yaml.render("default"), "regenerate: python -m pipeline.dvc_yaml > dvc.yaml"


def test_snakefile_and_dvc_yaml_run_the_same_commands(workdir):
    smk = snakemake_commands()
    dvc = dvc_commands(workdir)
    assert smk == dvc
    assert {rule for rule, _ in smk} == {"prepare_data", "random_init", "pretrain", "supervised", "teacher_swap",
                                         "pretrain_dbot", "knn", "linprobe", "segprobe", "finetune", "robustness",
                                         "checkpoint_eval", "analyze", "cka", "report"}
    # data, floor, 4 single-stage methods, supervised, (swap, stage) x 3 chains x 3 stages, 15 weights x (knn,
    # linprobe, segprobe, analyze), 9 final weights x (finetune, robustness), 4 methods' checkpoint_eval, cka, report
    assert len(smk) == 1 + 1 + 4 + 1 + 2 * 9 + 15 * 4 + 9 * 2 + 4 + 1 + 1


def test_every_node_has_its_stage_module_and_results_folder(workdir):
    for rule, cmd in snakemake_commands():
        module = cmd.split()[2]
        assert module == f"pipeline.stages.{rule}"
        assert Path(module.replace(".", "/") + ".py").is_file()


def test_snakemake_lint_is_clean(workdir):
    proc = run_cli("snakemake", "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr


def test_every_per_seed_node_runs_once_per_seed_in_both_dags(workdir):
    """params seeds [0, 1]: one prepare_data and one report; analyze and checkpoint_eval for the first seed (the
    report draws them); every other node twice, with --seed 0 and --seed 1."""
    from pipeline import dvc_yaml

    (workdir / "params/presets/two_seeds.yaml").write_text("seeds: [0, 1]\n")
    (workdir / "dvc.yaml").write_text(dvc_yaml.render("two_seeds"))
    smk = snakemake_commands("two_seeds")
    assert smk == dvc_commands(workdir)
    per_seed = [cmd for rule, cmd in smk if rule not in ("prepare_data", "report", "analyze", "checkpoint_eval")]
    assert len(smk) == 2 + 15 + 4 + 2 * (1 + 4 + 1 + 2 * 9 + 15 * 3 + 9 * 2 + 1)
    assert sorted(c for c in per_seed if "--seed 0" in c) == sorted(c.replace("--seed 1", "--seed 0")
                                                                    for c in per_seed if "--seed 1" in c)


def test_no_output_of_the_dag_is_committed(workdir):
    """An output committed at its own path counts as up to date: Snakemake in a fresh clone would build nothing
    (the default study's reference copy lives in results/reference/, which no node writes)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    run_cli("dvc", "init", "--no-scm", "-q")
    with Repo(str(workdir)) as repo:
        outs = {str(Path(out.fs_path).relative_to(workdir)) for stage in repo.index.stages for out in stage.outs}
    assert any(o.startswith("results/plots") for o in outs) and "results/summary.md" in outs
    committed = [f for f in tracked if any(f == o or f.startswith(o + "/") for o in outs)]
    assert not committed, committed
