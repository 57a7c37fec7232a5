"""pipeline.orchestration.record's commit of some stages in one pass writes the dvc.lock that DVC's own commit, one
stage at a time, writes, and leaves the others stale (the tiny study's record: tests/test_e2e_snakemake.py)."""
import json

import yaml
from conftest import run_cli
from dvc.repo import Repo

from pipeline.orchestration import record


def built_repo(root):
    """A DVC repository of three stages a -> b, c, whose outputs exist as if Snakemake had made them."""
    root.mkdir()
    run_cli("dvc", "init", "--no-scm", "-q", cwd=root)
    (root / "params.yaml").write_text("x: 1\ny: 2\n")
    stages = {"a": {"cmd": "echo a > a.txt", "outs": ["a.txt"], "params": ["x"]},
              "b": {"cmd": "cat a.txt > b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
              "c": {"cmd": "echo c > c.txt", "outs": ["c.txt"], "params": ["y"]}}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    for name in "abc":
        (root / f"{name}.txt").write_text(f"{name}\n")
    return root


def test_committing_some_stages_at_once_writes_what_dvc_writes_one_by_one(tmp_path, monkeypatch):
    ours, dvcs = built_repo(tmp_path / "ours"), built_repo(tmp_path / "dvc")
    monkeypatch.chdir(dvcs)                                     # DVC, like record, works in the repository
    with Repo(".") as repo:
        for name in ("a", "b"):
            repo.commit(name, force=True, relink=False)
    monkeypatch.chdir(ours)
    mtimes = {name: (ours / f"{name}.txt").stat().st_mtime_ns for name in "abc"}
    with Repo(".") as repo:
        record.commit_stages(repo, {"a", "b", "not-a-stage"})
    assert yaml.safe_load((ours / "dvc.lock").read_text()) == yaml.safe_load((dvcs / "dvc.lock").read_text())
    assert set(yaml.safe_load((ours / "dvc.lock").read_text())["stages"]) == {"a", "b"}
    # committed in place: no output relinked, which would make it newer than what reads it, for Snakemake
    assert {name: (ours / f"{name}.txt").stat().st_mtime_ns for name in "abc"} == mtimes
    assert set(json.loads(run_cli("dvc", "status", "--json").stdout)) == {"c"}
    with Repo(".") as repo:
        record.commit_stages(repo, set())                        # nothing named: dvc.lock as it was
    assert set(json.loads(run_cli("dvc", "status", "--json").stdout)) == {"c"}
