"""The tiny study through real `dvc repro` in a temporary git repository: a param edit reruns exactly
the stages it reaches."""
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import dry_run_jobs, run_cli

from pipeline.orchestration import params_reads

pytestmark = pytest.mark.e2e


def repro(*args, warm=True, command=("repro",)) -> set[str]:
    """The stages `dvc repro` (or `command`) ran or restored from DVC's run-cache; warm: under `python -m
    pipeline.orchestration.forkserver run --`, as docs/snakemake-dvc-mlflow.md shows (else cold: no fork server, not
    even the tests' own). Every node records the params keys it reads into reads/ (params_reads)."""
    prefix = [sys.executable, "-m", "pipeline.orchestration.forkserver", "run", "--"] if warm else []
    env = {params_reads.ENV: str(Path("reads").resolve())}
    out = run_cli(*prefix, "dvc", *command, *args, env=env if warm else {**env, "MIM_FORKSERVER": ""}).stdout
    return {ran or cached for ran, cached in re.findall(r"Running stage '([^']+)'|Stage '([^']+)' is cached", out)}


def status(*targets) -> set[str]:
    """The stages `dvc status` lists as changed: the targets and what they depend on."""
    return set(json.loads(run_cli("dvc", "status", "--json", "--with-deps", *targets).stdout))


def target_files(targets) -> list[str]:
    """The output files of DVC stages (node ids), as Snakemake targets."""
    from pipeline import config, dag

    params = config.load("tiny", check_paths=False)
    files = []
    for target in targets:
        node, values = dag.parse_node_id(target)
        files += [p for paths in node.output_paths(params, node.instance(params, values)).values() for p in paths]
    return files


def snakemake_jobs(targets) -> set[str]:
    """The nodes `snakemake -n` would run to make the targets' outputs."""
    return dry_run_jobs("tiny", *target_files(targets))


def declared_params(workdir) -> dict[str, list[str]]:
    """dvc.yaml's params of every stage (foreach items resolved): stage name -> keys of the resolved params file."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(workdir)) as repo:
        return {stage.name: [k for d in stage.deps if isinstance(d, ParamsDependency) for k in d.params]
                for stage in repo.index.stages if stage.name != "fingerprints"}


def edit(path, pattern, new):
    """Replace the first match of the regex `pattern` in the file by `new` (which may use its groups)."""
    text = path.read_text()
    assert re.search(pattern, text), pattern
    path.write_text(re.sub(pattern, new, text, count=1))


def test_dvc_repro_reruns_only_what_a_param_edit_reaches(workdir):
    """On the tiny preset, the random-teacher dBOT chain and MAE's evaluations (a subset of the DAG, to keep
    the test short: dvc repro runs one stage at a time; tests/test_dag.py checks the whole DAG's commands)."""
    from pipeline.orchestration import dvc_yaml

    (workdir / "dvc.yaml").write_text(dvc_yaml.render("tiny"))  # its lists (e.g. kept checkpoints) follow the preset
    run_cli("git", "init", "-q")
    run_cli("dvc", "init", "-q")
    targets = ["knn@seed0-dbot_random_stage2", "linprobe@seed0-dbot_random_stage2", "linprobe@seed0-mae"]
    first = repro(*targets)
    assert first == {"fingerprints", "prepare_data", "random_init@seed0", "pretrain@seed0-mae",
                     "linprobe@seed0-mae"} | {
        f"{node}@seed0-random_stage{k}" for node in ("teacher_swap", "pretrain_dbot") for k in range(3)} | {
        "knn@seed0-dbot_random_stage2", "linprobe@seed0-dbot_random_stage2"}
    assert "up to date" in run_cli("dvc", "status", *targets).stdout.lower()
    assert snakemake_jobs(targets) == set()              # one record: what DVC built, Snakemake sees as built

    edit(workdir / "params/base.yaml", r"  lr: 0\.1 ", "  lr: 0.05 ")
    assert repro(*targets, warm=False) == {"fingerprints", "linprobe@seed0-dbot_random_stage2", "linprobe@seed0-mae"}
    assert snakemake_jobs(targets) == set()

    edit(workdir / "params/base.yaml", r"stage1: \{epochs: (\d+), blr: 1\.5e-3\}", r"stage1: {epochs: \1, blr: 3.0e-3}")
    assert repro(*targets) == {"fingerprints", "pretrain_dbot@seed0-random_stage1",
                               "teacher_swap@seed0-random_stage2", "pretrain_dbot@seed0-random_stage2",
                               "knn@seed0-dbot_random_stage2", "linprobe@seed0-dbot_random_stage2"}
    metrics = run_cli("dvc", "metrics", "show").stdout
    assert "results/seed0/knn/dbot_random_stage2/metrics.json" in metrics
    run_cli("dvc", "plots", "show", "-o", "dvc_plots")                 # the pictures, declared as DVC plots
    page = (workdir / "dvc_plots/index.html").read_text()
    for picture in ("pretrain/mae/reconstruction.png", "pretrain_dbot/random_stage1/reconstruction.png"):
        assert picture.replace("/", "_") in page or picture in page, picture

    # Every node ran reads exactly the params dvc.yaml declares for it (and the Snakefile: the same NODE_PARAMS;
    # tests/test_e2e_snakemake.py checks every node of both DAGs).
    declared = declared_params(workdir)
    ran = sorted(Path("reads").glob("*.json"))
    assert {p.stem for p in ran} == first - {"fingerprints"}
    for path in ran:
        assert not params_reads.problems(json.loads(path.read_text()), declared[path.stem]), path.stem

    # Training curves as data series: dvc plots show renders loss.csv and online_knn.csv (x epoch).
    shown = json.loads(run_cli("dvc", "plots", "show", "--json").stdout)
    for series, y in (("pretrain/mae/loss.csv", "loss"),
                      ("pretrain_dbot/random_stage1/online_knn.csv", "online_knn_top1")):
        assert not [e for e in shown.get("errors", []) if e["name"] == f"results/seed0/{series}"], series  # built
        (entry,) = shown["data"][f"results/seed0/{series}"]
        text = json.dumps(entry)
        assert entry["type"] == "vega" and '"epoch"' in text and f'"{y}"' in text, (series, text[:500])

    # A preset edit: `dvc params diff` shows it, and once fingerprints has run, `dvc status` lists exactly the
    # stages that read the key (knn.k: the knn stage, not pre-training: its online k-NN has its own keys).
    run_cli("git", "add", "-A")
    run_cli("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny study")
    preset = workdir / "params/presets/tiny.yaml"
    before = preset.read_text()
    preset.write_text(before + "knn: {k: 3}\n")
    diff = run_cli("dvc", "params", "diff").stdout
    assert "params/presets/tiny.yaml" in diff and "knn.k" in diff, diff
    assert status(*targets) == {"fingerprints"}
    assert repro("fingerprints", warm=False) == {"fingerprints"}   # no torch in it: a fork server would only cost
    assert status(*targets) == {"knn@seed0-dbot_random_stage2"}
    assert re.search(r"params/resolved/tiny.yaml\s+knn.k\s+20\s+3", run_cli("dvc", "params", "diff").stdout)
    preset.write_text(before)
    repro("fingerprints", warm=False)
    assert status(*targets) == set()

    # The other way: Snakemake reruns what an edit reaches, then records it in DVC (pipeline.orchestration.record).
    edit(workdir / "params/base.yaml", r"  lr: 0\.05 ", "  lr: 0.02 ")
    assert snakemake_jobs(targets) == {"linprobe@seed0-dbot_random_stage2", "linprobe@seed0-mae"}
    run_cli("snakemake", "--cores", "2", *target_files(targets), "--config", "preset=tiny")
    assert status(*targets) == set() and snakemake_jobs(targets) == set()

    # An experiment: `dvc exp run -S` edits a params file and reruns exactly what the edit reaches.
    exp = repro("-S", "params/base.yaml:knn.k=3", "-n", "k3", *targets, command=("exp", "run"))
    assert exp == {"fingerprints", "knn@seed0-dbot_random_stage2"}
    shown = run_cli("dvc", "exp", "show", "--json").stdout
    rows = [e for rev in json.loads(shown) for e in rev.get("experiments") or [] for e in e.get("revs", [])]
    (k3,) = [r for r in rows if r.get("name") == "k3"]
    params = k3["data"]["params"]
    assert params["params/resolved/tiny.yaml"]["data"]["knn"]["k"] == 3
    assert params["params/base.yaml"]["data"]["knn"]["k"] == 3
