"""The tiny study end to end through real Snakemake, MLflow's SQLite store, and a no-op rerun; then what a
person looks at: the Snakemake HTML report and the MLflow UI, in headless Chromium.

Then fault injection on that same study (last: it kills and reruns its nodes):

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
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from browser import browser_page, mlflow_ui
from conftest import dry_run_jobs, run_cli
from mlflow.tracking import MlflowClient

from pipeline import hardware
from pipeline.dag import stage_module

pytestmark = pytest.mark.e2e
CHAINS = ("random", "mae")      # params dbot.chains: the tiny preset adds the MAE-started chain (a teacher-swap study)
FINAL = {"random_init", "mae", "sdae", "rcmae", "bootmae", "supervised"} | {f"dbot_{c}_stage2" for c in CHAINS}


def test_tiny_study_builds_tracks_and_reruns_nothing(study, monkeypatch):
    workdir = study
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/mlflow.db")
    log = (workdir / "snakemake.stderr").read_text()
    assert "fork server ready" in log and "fork server stopped" in log          # nodes started warm
    assert not [p for p in Path("results").rglob("logs/**/*.log") if "starts cold" in p.read_text()]
    table = pd.read_csv("results/summary.csv")
    assert {"method", "stage", "weights", "protocol", "metric", "value"} <= set(table.columns)
    knn_settings = {"k": 20, "temperature": 0.07, "feature": "cls", "precision": "auto"}
    chains = CHAINS
    weights = {"random_init", "mae", "sdae", "rcmae", "bootmae", "supervised"} | {
        f"dbot_{c}_stage{k}" for c in chains for k in range(3)}
    probed = weights | {"pixels"}                                       # knn and linprobe also run on the raw pixels
    for protocol, metric, evaluated in (("knn", "top1", probed), ("linprobe", "top1", probed),
                                        ("segprobe", "miou", weights), ("finetune", "top1", FINAL),
                                        ("robustness", "mean_corrupted_top1", FINAL)):
        rows = table[(table.protocol == protocol) & (table.metric == metric)]
        assert set(rows.weights) == evaluated and rows.value.between(0, 1).all(), protocol
    mae = json.loads((workdir / "results/seed0/pretrain/mae/metrics.json").read_text())
    assert all(0 <= e["online_knn_top1"] <= 1 for e in mae["epochs"])          # online k-NN every epoch (tiny)
    curve = json.loads((workdir / "results/seed0/checkpoint_eval/mae/metrics.json").read_text())
    assert [r["epoch"] for r in curve["epochs"]] == [1, 2]                      # kept at epoch 1, final at 2
    for picture in ("pretrain/mae", "pretrain/bootmae", "pretrain_dbot/random_stage1", "pretrain/sdae"):
        assert (workdir / "results/seed0" / picture / "reconstruction.png").read_bytes()[:4] == b"\x89PNG"
    analysis = json.loads((workdir / "results/seed0/analyze/dbot_random_stage1/analysis.json").read_text())
    assert len(analysis["attention_distance"]) == 2 and len(analysis["attention_distance"][0]) == 2  # depth x heads
    assert all(0 < s <= 1 for s in analysis["singular_value_share"])
    cka = json.loads((workdir / "results/seed0/cka/cka.json").read_text())
    # first chain's consecutive stages (2) + 5 trained encoders vs its last stage + 1 chain pair x (teachers + 3 stages)
    assert len(cka["pairs"]) == 2 + 5 + 1 * 4 and set(cka["swap"]) == {"teacher", "0", "1", "2"}
    assert all(0 <= v <= 1 + 1e-6 for v in cka["pairs"]["dbot_random_stage2 vs dbot_mae_stage2"])
    spread = pd.read_csv("results/swap_spread.csv")
    assert set(spread.stage) == {"teacher", "0", "1", "2"} and (spread.chains == 2).all()
    assert "## Teacher-swap study" in (workdir / "results/summary.md").read_text()
    assert "## Claims" in (workdir / "results/summary.md").read_text()
    claims = pd.read_csv("results/claims.csv")
    assert {"above_random_init", "above_pixels", "dbot_stage_gain", "teacher_spread_shrinks", "beats_mae",
            "rcmae_early_knn"} == set(claims.claim)
    assert set(claims.verdict) <= {"holds", "does not hold"}                   # one seed: no seed spread
    pixels = json.loads((workdir / "results/seed0/knn/pixels/metrics.json").read_text())
    assert pixels["weights"]["evaluated"] == "pixels" and pixels["settings"] == knn_settings
    for png in ("pretrain_loss", "online_knn", "protocols", "checkpoint_eval", "chain_accuracy", "accuracy_vs_compute",
                "attention_distance", "singular_value_share", "swap_study"):
        assert (workdir / "results" / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    knn = json.loads((workdir / "results/seed0/knn/dbot_random_stage1/metrics.json").read_text())
    assert knn["settings"] == knn_settings
    auto = hardware.resolve("auto", "cpu")                # every node records the precision it ran in, and why
    assert (knn["precision"], knn["precision_asked"], knn["precision_reason"]) == (auto.name, "auto", auto.reason)
    assert (mae["precision"], mae["precision_asked"]) == ("fp32", "fp32")       # the tiny preset trains in fp32
    assert knn["weights"]["evaluated"] == "student" and len(knn["weights"]["sha256"]) == 64
    rcmae = json.loads((workdir / "results/seed0/linprobe/rcmae/metrics.json").read_text())
    assert rcmae["weights"]["evaluated"] == "teacher"                 # rcmae.evaluate_weights, recorded
    swap = json.loads((workdir / "results/seed0/teacher_swap/mae_stage1/teacher.json").read_text())
    assert (swap["source"] == "results/seed0/pretrain_dbot/mae_stage0/encoder.safetensors"
            and swap["source_node"] == "pretrain_dbot")
    swap = json.loads((workdir / "results/seed0/teacher_swap/mae_stage0/teacher.json").read_text())
    assert swap["source"] == "results/seed0/pretrain/mae/encoder.safetensors" and swap["source_method"] == "mae"
    assert (workdir / "results/seed0/benchmarks/pretrain/mae.tsv").is_file()
    flops = table[(table.protocol == "pretrain") & (table.metric == "train_flops")].set_index("weights").value
    assert flops["bootmae"] > flops["mae"] > 0 and flops["dbot_random_stage0"] > 0   # compute accounting per node
    assert not (workdir / "results/.resume/pretrain@seed0-mae").exists()

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = {r.data.tags["chain"]: r.info.run_id for r in runs if r.data.tags.get("role") == "chain"}
    assert {"mae", "sdae", "rcmae", "bootmae", "random_init", "pixels"} | {f"dbot_{c}" for c in chains} <= set(parents)
    assert "knn@seed0-pixels" in {r.info.run_name for r in runs
                                  if r.data.tags.get("mlflow.parentRunId") == parents["pixels"]}
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents["dbot_mae"]}
    assert {"teacher_swap@seed0-mae_stage0", "pretrain_dbot@seed0-mae_stage0", "teacher_swap@seed0-mae_stage2",
            "knn@seed0-dbot_mae_stage2", "linprobe@seed0-dbot_mae_stage1"} <= children
    stage2 = next(r for r in runs if r.info.run_name == "pretrain_dbot@seed0-random_stage2")
    assert stage2.data.params["pretrain.mask_ratio"] == "0.75" and "dataset_hash" in stage2.data.tags
    assert stage2.data.tags["precision"] == "fp32" and "CPU capability" in stage2.data.tags["precision_reason"]
    assert len(client.get_metric_history(stage2.info.run_id, "loss")) == 1
    finetune = next(r for r in runs if r.info.run_name == "finetune@seed0-mae")
    assert len(client.get_metric_history(finetune.info.run_id, "val_top1")) == 1   # per epoch (tiny: 1 epoch)
    artifacts = {a.path for a in client.list_artifacts(finetune.info.run_id)}
    assert {"metrics.json", "curve.png"} <= artifacts
    pretrain = next(r for r in runs if r.info.run_name == "pretrain@seed0-mae")
    assert "reconstruction.png" in {a.path for a in client.list_artifacts(pretrain.info.run_id)}

    again = run_cli("snakemake", "--cores", "2", "--config", "preset=tiny")
    assert "Nothing to be done" in again.stdout + again.stderr


def snakemake_jobs(*args) -> set[str]:
    return dry_run_jobs("tiny", *args)


def dvc_changed() -> set[str]:
    """The nodes `dvc status` lists, after DVC's own first stage has refreshed the fingerprints (`dvc repro
    fingerprints`, as `dvc repro` does first), with everything downstream of them (what `dvc repro` would rerun)."""
    run_cli("dvc", "repro", "-q", "fingerprints")
    return downstream(set(json.loads(run_cli("dvc", "status", "--json").stdout)) - {"fingerprints"})


def downstream(nodes: set[str]) -> set[str]:
    """The nodes and every node that reads their outputs, directly or not (the tiny study's DAG, from the table)."""
    from pipeline import config, dag

    params = config.load("tiny", check_paths=False)
    maker = {p: node.node_id(inst) for node, inst in dag.instances(params)
             for paths in node.output_paths(params, inst).values() for p in paths}
    readers: dict[str, set] = {}
    for node, inst in dag.instances(params):
        for p in [p for paths in node.inputs(params, inst).values() for p in paths]:
            readers.setdefault(maker[p], set()).add(node.node_id(inst))
    out, todo = set(), list(nodes)
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo += readers.get(n, ())
    return out


def declaring(module: str, study: Path) -> set[str]:
    """The nodes whose code (their fingerprint's import closure) holds `module`."""
    return {p.stem for p in (study / "results/.fingerprints").glob("*")
            if module in json.loads(p.read_text())["code"]}


AUGMENT = "            hflip: bool) -> torch.Tensor:\n"              # augment()'s signature ends here
# module -> (its file, a changed statement, an edit of comments, docstrings or layout only, nodes it must reach,
# nodes it must not): an edit is (text, replacement), or (None, text to append)
CODE_EDITS = {
    "pipeline.models.losses": ("pipeline/models/losses.py", (None, "\nEDITED = 1\n"), (None, "\n# a comment\n"),
                               {"pretrain_dbot@seed0-random_stage1", "knn@seed0-mae"},
                               {"prepare_data", "knn@seed0-pixels", "knn@seed0-random_init"}),
    "pipeline.data.steps": ("pipeline/data/steps.py", (AUGMENT, AUGMENT + "    hflip = bool(hflip)\n"),
                            (AUGMENT, AUGMENT.replace(":\n", ":  # a comment\n")),
                            {"pretrain@seed0-mae", "finetune@seed0-random_init", "report"},
                            {"prepare_data", "random_init@seed0", "knn@seed0-pixels", "linprobe@seed0-random_init"}),
    "pipeline.evaluation.probes": ("pipeline/evaluation/probes.py", (None, "\nEDITED = 1\n"),
                                   ('"""', '"""A reworded docstring.\n\n'),
                                   {"knn@seed0-pixels", "linprobe@seed0-random_init"},
                                   {"prepare_data", "random_init@seed0", "teacher_swap@seed0-random_stage0"}),
    "pipeline.methods.sdae": ("pipeline/methods/sdae.py", (None, "\nEDITED = 1\n"), (None, "\n\n\n# layout\n"),
                              {"pretrain@seed0-sdae", "knn@seed0-sdae"}, {"pretrain@seed0-mae", "knn@seed0-mae"}),
}


def edited(text: str, edit: tuple) -> str:
    old, new = edit
    out = text + new if old is None else text.replace(old, new, 1)
    assert out != text
    return out


def test_a_built_study_is_recorded_in_dvc_and_an_edit_reaches_both_dags_alike(study, monkeypatch):
    """After Snakemake's build, DVC has nothing to reproduce (pipeline.orchestration.record). Then, one at a time,
    a params edit and a changed statement in a loss, augment(), the probes and one method module: `snakemake -n`
    and DVC list the same nodes, exactly those whose params or code hold the edit and what reads their outputs; a
    comment-only edit of the same files lists nothing; undone, both have nothing to do again."""
    monkeypatch.chdir(study)
    assert "record: 91 of 91 nodes recorded in DVC" in (study / "snakemake.stderr").read_text()
    assert json.loads(run_cli("dvc", "status", "--json").stdout) == {}     # (Snakemake's: the first test)

    base = study / "params/base.yaml"
    original = base.read_text()
    base.write_text(original.replace("\nknn:\n  k: 20 ", "\nknn:\n  k: 7 ", 1))
    from pipeline import config, dag

    params = config.load("tiny", check_paths=False)
    knn = {dag.NODES["knn"].node_id(i) for i in dag.NODES["knn"].instances(params)}
    listed = snakemake_jobs()
    assert listed == dvc_changed() == downstream(knn | {"checkpoint_eval@seed0-mae"}) and "report" in listed
    assert not {n for n in listed if n.startswith(("pretrain", "linprobe", "segprobe", "finetune"))}
    base.write_text(original)                          # undone: the checks below see nothing of it

    texts = {module: (study / path).read_text() for module, (path, *_) in CODE_EDITS.items()}
    for module, (path, statement, comment, reached, untouched) in CODE_EDITS.items():
        (study / path).write_text(edited(texts[module], statement))
        expected = downstream(declaring(module, study))
        listed = snakemake_jobs()
        assert listed == dvc_changed() == expected, module
        assert reached <= expected and not untouched & expected, module
        (study / path).write_text(edited(texts[module], comment))    # the next checks see it: nothing to rerun
    assert snakemake_jobs() == set() and dvc_changed() == set(), "comment, docstring and layout edits"
    for module, (path, *_) in CODE_EDITS.items():
        (study / path).write_text(texts[module])
    assert snakemake_jobs() == set() and dvc_changed() == set(), "every edit undone"
    assert declaring("pipeline.methods.sdae", study) == {"pretrain@seed0-sdae"}
    assert "pretrain_dbot@seed0-random_stage1" in declaring("pipeline.models.losses", study)


def shown_in_report(page, uri: str) -> dict[tuple[str, str], int]:
    """Click through the report as a person does: every category, every subcategory, the eye icon of every
    result; count the results whose picture is displayed (a PNG image with a width), per (category, sub). The
    report's own menu leads back: "Results" to the categories, the category's name to its subcategories (a page
    load per subcategory took 0.8 s of the test's time, for 58 of them on tiny)."""
    page.goto(uri)
    categories = page.evaluate("() => categories")                    # {category: {subcategory: [paths]}}
    shown = {}
    eyes = page.locator("a[iconname=eye]")
    for i, (category, subs) in enumerate(categories.items()):
        if i:
            page.get_by_text("Results", exact=True).first.click()
            eyes.first.wait_for(state="detached", timeout=30000)        # the list of categories
        for j, sub in enumerate(subs):
            if not j or len(subs) > 1:
                page.get_by_text(category, exact=True).first.click()
            if len(subs) > 1:
                eyes.first.wait_for(state="detached", timeout=30000)    # the list of subcategories, no results
                page.get_by_text(sub, exact=True).first.click()
            eyes.first.wait_for(timeout=30000)
            count = 0
            for k in range(eyes.count()):
                eyes.nth(k).click()
                width = page.locator("img[src^='data:image/png']").first.evaluate(
                    "img => img.complete ? img.naturalWidth : new Promise(r => img.onload = () => r(img.naturalWidth))")
                count += width > 0
            shown[(category, sub)] = count
    return shown


def test_every_node_reads_the_params_both_dags_declare(study):
    """Each node of the tiny study recorded the params keys it read (the study fixture sets $MIM_PARAMS_READS):
    they equal the params in the fingerprint its Snakemake job read and its dvc.yaml stage's params."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    from pipeline.orchestration import params_reads

    reads = {p.stem: json.loads(p.read_text()) for p in (study / "reads").glob("*.json")}
    smk = {p.stem: sorted(json.loads(p.read_text())["params"]) for p in (study / "results/.fingerprints").glob("*")}
    with Repo(str(study)) as repo:
        dvc = {s.name: sorted({k for d in s.deps if isinstance(d, ParamsDependency) for k in d.params})
               for s in repo.index.stages if s.name != "fingerprints"}
    assert set(reads) == set(smk) == set(dvc) and len(reads) == 91
    for node, recorded in reads.items():
        assert smk[node] == dvc[node], node
        assert not params_reads.problems(recorded, dvc[node]), node


# Modules a node's CLI may import without running them on the tiny study; anything else a node declares (its import
# closure) it imported, and it imported nothing it does not declare.
NOT_ALWAYS_RUN = {
    "pipeline.data.stream": "reads a streamed image folder (data.format stream; tests/test_e2e_stream.py)",
    "pipeline.orchestration.forkserver": "hands a node to a fork server: in the node's first process, not the one "
                                         "that does the work (the recorded one)",
    "pipeline.orchestration.launch": "starts a compute node's work; a node that copies or gathers works in-process",
    "pipeline.train": "(the package of train.distributed, which launch imports)",
    "pipeline.train.distributed": "(imported by launch: the processes of a data-parallel node)",
    "pipeline.ranks": "(imported by train.distributed)",
    "pipeline.hardware": "the device and precision of a node's work: not for analyses that take the encoder as is, nor "
                         "for prepare_data on a tensor dataset",
    "pipeline.evaluation.probes": "the probes' features (stages/evaluation/common.evaluate): not for analyze and cka",
    "pipeline.models.encoder": "teacher_swap builds an Encoder only for an arch other than the plain timm ViTs",
    "pipeline.settings": "(imported by models.encoder, whose build_encoder takes a settings.Model)",
}


def test_every_node_imported_exactly_the_code_it_declares(study):
    """The modules each node of the tiny study imported ($MIM_CODE_READS) are in its declared code, the import
    closure in its fingerprint; what it declares but did not import is a module of NOT_ALWAYS_RUN."""
    declared = {p.stem: set(json.loads(p.read_text())["code"]) for p in (study / "results/.fingerprints").glob("*")}
    ran = {p.stem: set(json.loads(p.read_text())) for p in (study / "code").glob("*.json")}
    assert set(ran) == set(declared) and len(ran) == 91
    unused = set()
    for node, modules in ran.items():
        assert modules <= declared[node], f"{node} ran undeclared code: {sorted(modules - declared[node])}"
        extra = declared[node] - modules
        assert extra <= set(NOT_ALWAYS_RUN), f"{node} declares code it did not import: {sorted(extra)}"
        unused |= extra
    assert unused == set(NOT_ALWAYS_RUN)                                  # every exception is needed


def test_snakemake_report_shows_every_plot_in_chromium(study):
    run_cli("snakemake", "--cores", "1", "--report", "report.html", "--config", "preset=tiny", cwd=study, timeout=600)
    with browser_page() as page:
        uri = (study / "report.html").as_uri()
        page.goto(uri)
        results = set(page.evaluate("() => Object.keys(results)"))
        categories = page.evaluate("() => categories")
        expected = {(c, s): len(paths) for c, subs in categories.items() for s, paths in subs.items()}
        shown = shown_in_report(page, uri)
    marked = {"results/plots/pretrain_loss.png", "results/plots/protocols.png", "results/plots/online_knn.png",
              "results/seed0/pretrain/mae/reconstruction.png", "results/seed0/finetune/dbot_mae_stage2/curve.png",
              "results/seed0/segprobe/random_init/examples.png", "results/seed0/robustness/mae/robustness.png",
              "results/seed0/checkpoint_eval/sdae/curve.png", "results/seed0/analyze/mae/attention_heads.png"}
    assert marked <= results, sorted(marked - results)
    assert len(results) == sum(expected.values()) > 60                # every node's plot and the report's
    assert shown == expected                                          # each one displayed when clicked


def test_mlflow_ui_shows_chains_with_their_runs_and_metrics(study):
    client = MlflowClient(f"sqlite:///{study}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    knn = json.loads((study / "results/seed0/knn/dbot_mae_stage2/metrics.json").read_text())["metrics"]["top1"]
    with mlflow_ui(study / "mlflow.db") as url, browser_page() as page:
        page.goto(f"{url}/#/experiments/{experiment}/runs", timeout=120000)
        page.wait_for_selector("text=mae seed0", timeout=120000)
        search = page.get_by_placeholder("metrics.rmse", exact=False)
        search.fill("tags.chain = 'dbot_mae'")
        search.press("Enter")
        parent = page.locator("[role=row]", has_text="dbot_mae seed0").first
        parent.wait_for(timeout=60000)
        parent.locator("button").first.click()                         # expand the chain's parent run
        for child in ("teacher_swap@seed0-mae_stage0", "pretrain_dbot@seed0-mae_stage1", "knn@seed0-dbot_mae_stage2",
                      "finetune@seed0-dbot_mae_stage2", "segprobe@seed0-dbot_mae_stage0"):
            page.get_by_text(child, exact=True).wait_for(timeout=60000)
        page.get_by_text("knn@seed0-dbot_mae_stage2", exact=True).click()
        page.get_by_text("top1", exact=True).wait_for(timeout=60000)
        assert f"{knn}"[:5] in page.inner_text("body")                 # the metric's value on the run page


def test_bad_params_stop_snakemake_before_any_job(workdir):
    proc = run_cli("snakemake", "--cores", "1", "--config", "preset=tiny", "--dry-run", check=False)
    assert proc.returncode == 0
    (workdir / "params/presets/broken.yaml").write_text("pretrain: {mask_ratio: 1.2}\n")
    proc = run_cli("snakemake", "--cores", "1", "--config", "preset=broken", check=False)
    assert proc.returncode != 0
    assert "pretrain.mask_ratio: 1.2 is greater than or equal to the maximum of 1" in proc.stderr
    assert not (workdir / "results/prepare_data").exists()


# --- fault injection on the study (runs last) ---
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
    "report": ([], ["results/summary.csv", "results/summary.md", "results/plots", "results/swap_spread.csv",
                    "results/claims.csv"],
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


TEMPORARY = re.compile(r"\..+\.tmp")   # checkpoint.atomic_write's temporary file, which a SIGKILL can leave
                                        # (never under the final name); the rerun's write of that file removes it


def node_argv(node: str) -> list[str]:
    return [sys.executable, "-m", stage_module(node), "--preset", "tiny", *NODES[node][0]]


def remove_outputs(root: Path, outputs: list[str]) -> None:
    for f in files(root, outputs):
        f.unlink()


@pytest.fixture(scope="module")
def warm(study):
    """A fork server in the study's folder: the nodes below start warm, as Snakemake ran them (so the study's
    benchmark times place each kill inside the node's own work)."""
    from pipeline.orchestration import forkserver

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(study)
        proc, path = forkserver.start(parent=os.getpid())
    yield proc, {**ENV, forkserver.ENV: path}
    forkserver.stop(proc, path)


def children(pid: int) -> list[int]:
    """Live processes whose parent is pid (the fork server's running nodes)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


@pytest.mark.parametrize("node", list(NODES))
def test_sigkill_at_a_random_point_then_rerun_gives_the_studys_outputs(node, study, warm, monkeypatch):
    monkeypatch.chdir(study)
    server, env = warm
    _, outputs, bench = NODES[node]
    seconds = float((study / bench).read_text().splitlines()[1].split("\t")[0])   # its uninterrupted run
    if node == "report":        # its tables hold the training nodes' wall times, which the reruns above changed
        run_cli(*node_argv(node), env=env, timeout=600)
    reference = {f.relative_to(study): digest(f) for f in files(study, outputs)}
    assert reference, f"the study made no outputs for {node}"
    rng = random.Random(f"{node}-{os.environ.get('FAULT_SEED', '0')}")
    delay = rng.uniform(0.4, 0.95) * seconds
    for _ in range(4):             # a warm node may finish before its study time's share: then kill the next
        remove_outputs(study, outputs)     # try at a random point of the run it just made
        started = time.monotonic()
        proc = subprocess.Popen(node_argv(node), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, **env), start_new_session=True)
        try:
            proc.wait(timeout=delay)
            delay = rng.uniform(0.3, 0.8) * (time.monotonic() - started)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
    assert proc.returncode == -signal.SIGKILL, f"{node} ended ({proc.returncode}) before it could be killed"
    deadline = time.time() + 10                 # the server kills the node's child when its process dies
    while children(server.pid):
        assert time.time() < deadline, f"{node}: the killed node's child still runs"
        time.sleep(0.02)
    left = {f.relative_to(study): digest(f) for f in files(study, outputs) if not TEMPORARY.fullmatch(f.name)}
    partial = sorted(str(name) for name, h in left.items() if reference.get(name) != h)
    assert not partial, f"{node}: outputs unlike the study's after SIGKILL: {partial}"
    run_cli(*node_argv(node), env=env, timeout=600)
    again = {f.relative_to(study): digest(f) for f in files(study, outputs)}
    differ = sorted(str(name) for name in again.keys() | reference.keys() if again.get(name) != reference.get(name))
    assert not differ, f"{node} (killed after {delay:.1f} s of ~{seconds:.0f} s): outputs differ: {differ}"


def test_a_failed_write_keeps_the_earlier_output_and_no_temporary(study, monkeypatch, capsys):
    """The disk fills up while knn writes its metrics: one line, the earlier metrics.json as it was."""
    from pipeline import checkpoint
    from pipeline.stages.evaluation import knn

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
    from pipeline.stages.evaluation import linprobe

    monkeypatch.chdir(study)
    outputs = NODES["linprobe"][1]
    reference = {f: digest(f) for f in files(study, outputs)}
    first = subprocess.Popen(node_argv("linprobe"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, **ENV, MIM_FORKSERVER=""))   # cold: the lock names its own pid
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
