"""The Snakefile and dvc.yaml describe the same nodes with the same commands; Snakemake lints clean."""
import re
import subprocess
from pathlib import Path

from conftest import ROOT, run_cli
from dvc.repo import Repo

from pipeline.dag import stage_module


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
        return {(stage.name.split("@")[0], stage.cmd) for stage in repo.index.stages
                if stage.name != "fingerprints"}           # DVC's own: refreshes what its stages depend on


def test_committed_dvc_yaml_is_the_generated_one():
    from pipeline.orchestration import dvc_yaml

    assert Path("dvc.yaml").read_text() == dvc_yaml.render("default"), (
        "regenerate: python -m pipeline.orchestration.dvc_yaml > dvc.yaml")


def test_snakefile_and_dvc_yaml_run_the_same_commands(workdir):
    smk = snakemake_commands()
    dvc = dvc_commands(workdir)
    assert smk == dvc
    assert {rule for rule, _ in smk} == {"prepare_data", "random_init", "pretrain", "supervised", "teacher_swap",
                                         "pretrain_dbot", "knn", "linprobe", "segprobe", "finetune", "robustness",
                                         "checkpoint_eval", "analyze", "cka", "report"}
    # data, floor, 4 single-stage methods, supervised, (swap, stage) x 1 chain x 3 stages, 9 weights x (knn,
    # linprobe, segprobe, analyze), the pixel floor x (knn, linprobe), 7 final weights x (finetune, robustness),
    # 4 methods' checkpoint_eval, cka, report
    assert len(smk) == 1 + 1 + 4 + 1 + 2 * 3 + 9 * 4 + 2 + 7 * 2 + 4 + 1 + 1
    pixels = {cmd for rule, cmd in smk if "--weights pixels" in cmd}
    assert pixels == {f"python -m {stage_module(node)} --preset default --seed 0 --weights pixels"
                      for node in ("knn", "linprobe")}


def test_every_node_has_its_stage_module_and_results_folder(workdir):
    for rule, cmd in snakemake_commands():
        module = cmd.split()[2]
        assert module == stage_module(rule)
        assert Path(module.replace(".", "/") + ".py").is_file()


def test_snakemake_lint_is_clean(workdir):
    proc = run_cli("snakemake", "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr


def test_every_per_seed_node_runs_once_per_seed_in_both_dags(workdir):
    """params seeds [0, 1]: one prepare_data and one report; analyze and checkpoint_eval for the first seed (the
    report draws them); every other node twice, with --seed 0 and --seed 1."""
    from pipeline.orchestration import dvc_yaml

    (workdir / "params/presets/two_seeds.yaml").write_text("seeds: [0, 1]\n")
    (workdir / "dvc.yaml").write_text(dvc_yaml.render("two_seeds"))
    smk = snakemake_commands("two_seeds")
    assert smk == dvc_commands(workdir)
    per_seed = [cmd for rule, cmd in smk if rule not in ("prepare_data", "report", "analyze", "checkpoint_eval")]
    assert len(smk) == 2 + 9 + 4 + 2 * (1 + 4 + 1 + 2 * 3 + 9 * 3 + 2 + 7 * 2 + 1)
    assert sorted(c for c in per_seed if "--seed 0" in c) == sorted(c.replace("--seed 1", "--seed 0")
                                                                    for c in per_seed if "--seed 1" in c)


def test_a_streamed_study_leaves_out_the_nodes_that_hold_every_image(workdir):
    """preset imagenet streams (data.format stream): both DAGs build from params alone (no data folder) with the
    same commands and none of layout.IN_MEMORY_NODES; knn and linprobe without the pixel floor."""
    from pipeline import layout
    from pipeline.orchestration import dvc_yaml

    (workdir / "dvc.yaml").write_text(dvc_yaml.render("imagenet"))
    smk = snakemake_commands("imagenet")
    assert smk == dvc_commands(workdir)
    assert {rule for rule, _ in smk} == {"prepare_data", "random_init", "pretrain", "supervised", "teacher_swap",
                                         "pretrain_dbot", "knn", "linprobe", "finetune", "report"}
    assert not set(layout.IN_MEMORY_NODES) & {rule for rule, _ in smk}
    assert not [cmd for _, cmd in smk if "--weights pixels" in cmd]


def test_no_output_of_the_dag_is_committed(workdir):
    """An output committed at its own path counts as up to date: Snakemake in a fresh clone would build nothing
    (the default study's reference copy lives in results/reference/, which no node writes)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    run_cli("dvc", "init", "--no-scm", "-q")
    with Repo(str(workdir)) as repo:
        outs = {str(Path(out.fs_path).relative_to(workdir)) for stage in repo.index.stages for out in stage.outs}
    assert any(o.startswith("results/plots") for o in outs) and "results/summary.md" in outs
    committed = [f for f in tracked if any(f == o or f.startswith(o + "/") for o in outs)]
    assert committed == ["params/resolved/default.yaml"], committed   # not Snakemake's: the values DVC compares


def dbot_job_files(preset: str, target: str) -> dict[str, tuple[set, set]]:
    """Snakemake's dry run of `target`: pretrain_dbot job key -> (its input files, its output files)."""
    proc = run_cli("snakemake", "--dry-run", "--forceall", target, "--config", f"preset={preset}")
    out = proc.stdout + proc.stderr
    jobs, rule, files = {}, None, {}
    for line in out.splitlines() + ["rule end:"]:
        if re.match(r"^(?:local)?rule \w+:", line):
            if rule == "pretrain_dbot":
                jobs[files["wildcards"].split("key=")[1].split(",")[0]] = (files["input"], files["output"])
            rule, files = line.split()[1].rstrip(":"), {}
        elif line.strip().startswith(("input:", "output:", "wildcards:")):
            name, _, value = line.strip().partition(": ")
            files[name] = value if name == "wildcards" else set(value.split(", "))
    return jobs


def test_carried_optimizer_state_is_an_edge_of_both_dags_only_when_enabled(workdir):
    """dbot.carry_optimizer_state: stage k's optimizer.pt is an output of pretrain_dbot stage k and an input of
    stage k+1, in the Snakefile and in dvc.yaml; off (the default), neither DAG has the file."""
    from pipeline.orchestration import dvc_yaml

    (workdir / "params/presets/carry.yaml").write_text("dbot: {carry_optimizer_state: true}\n")
    state = {k: f"results/seed0/pretrain_dbot/random_stage{k}/optimizer.pt" for k in (0, 1)}
    target = "results/seed0/pretrain_dbot/random_stage1/encoder.safetensors"
    jobs = dbot_job_files("carry", target)
    assert state[0] in jobs["random_stage0"][1] and state[0] in jobs["random_stage1"][0]
    assert state[1] in jobs["random_stage1"][1] and not any("optimizer" in f for f in jobs["random_stage0"][0])
    assert not any("optimizer" in f
                   for files in dbot_job_files("default", target).values() for f in files[0] | files[1])
    run_cli("dvc", "init", "--no-scm", "-q")
    for preset, on in (("carry", True), ("default", False)):
        (workdir / "dvc.yaml").write_text(dvc_yaml.render(preset))
        with Repo(str(workdir)) as repo:
            stages = {s.name: s for s in repo.index.stages}
            deps = {str(d.def_path) for d in stages["pretrain_dbot@seed0-random_stage1"].deps}
            outs = {str(o.def_path) for o in stages["pretrain_dbot@seed0-random_stage0"].outs}
        assert (state[0] in deps, state[0] in outs) == (on, on), preset


def test_both_dags_declare_the_params_of_the_node_table(workdir):
    """dvc.yaml's stages declare the params keys of their node's entry in the node table (pipeline/dag.py; their
    reads are checked by tests/test_e2e_*.py), as keys of the resolved params, which the first stage, fingerprints,
    writes from base.yaml and the preset: the committed one is the resolved default study. Snakemake's rules see the
    same keys with their values in each node's fingerprint (tests/test_fingerprints.py)."""
    from dvc.dependency.param import ParamsDependency

    from pipeline import config, dag
    from pipeline.orchestration import fingerprints

    assert Path("params/resolved/default.yaml").read_text() == fingerprints.resolved_text("default"), \
        "regenerate: python -m pipeline.orchestration.fingerprints"
    run_cli("dvc", "init", "--no-scm", "-q")
    with Repo(str(workdir)) as repo:
        stages = {stage.name: stage for stage in repo.index.stages}
    params = config.load("default", check_paths=False)
    for name, stage in stages.items():
        files = {str(d.def_path): list(dict.fromkeys(d.params)) for d in stage.deps if isinstance(d, ParamsDependency)}
        if name == "fingerprints":
            assert set(files) == {"params/base.yaml", "params/presets/default.yaml"} and not any(files.values())
            continue
        node, values = dag.parse_node_id(name)
        declared = node.declared_params(node.instance(params, values))
        assert files == {"params/resolved/default.yaml": declared}, name
        assert f"results/.fingerprints/{name}.json" in {str(d.def_path) for d in stage.deps}, name


def rule_graph(dot: str) -> set[tuple[str, str]]:
    """The (from rule, to rule) edges of a `snakemake --rulegraph` dot file."""
    names = dict(re.findall(r'^\s*(\d+)\[label = "(\w+)"', dot, re.M))
    return {(names[a], names[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M)}


def test_the_committed_dag_picture_is_the_rule_graph():
    """docs/dag.dot (drawn as docs/dag.png, README's picture) is what Snakemake says today (docs/dag.md: how to
    redraw it)."""
    proc = run_cli("snakemake", "--cores", "1", "--rulegraph")
    committed = rule_graph((ROOT / "docs/dag.dot").read_text())
    assert rule_graph(proc.stdout) == committed and len(committed) > 20
