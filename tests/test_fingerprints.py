"""A node's fingerprint (pipeline.orchestration.fingerprints): its code is its import closure, hashed by syntax tree,
so a changed statement changes it and a comment, docstring or layout edit does not; files are rewritten only when
their content changes, and dated back when an undone edit returns them to what the outputs were built with.
(What each node of the tiny study really imports is checked against its closure in tests/test_e2e_snakemake.py.)"""
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from pipeline import config, dag
from pipeline.orchestration import fingerprints


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A copy of the pipeline package that fingerprints reads instead of the real one."""
    copy = tmp_path / "pipeline"
    shutil.copytree(fingerprints.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fingerprints, "PACKAGE", copy)
    fingerprints.forget()
    yield copy
    fingerprints.forget()


def rehash(module: str) -> str:
    fingerprints.forget()
    return fingerprints.module_hash(module)


def test_comments_docstrings_and_layout_change_no_hash_a_statement_does(package):
    losses = package / "models/losses.py"
    before = rehash("pipeline.models.losses")
    text = losses.read_text()
    first_def = text.index("\ndef ")
    name_end = text.index("(", first_def)
    edits = {
        "comment": text + "\n# a comment\n",
        "docstring": text.replace('"""', '"""Reworded. ', 1),
        "blank lines and a wrapped call": text.replace("\ndef ", "\n\n\ndef ", 1),
    }
    for what, edited in edits.items():
        losses.write_text(edited)
        assert rehash("pipeline.models.losses") == before, what
    losses.write_text(text[:name_end] + "_renamed" + text[name_end:])       # a changed statement
    assert rehash("pipeline.models.losses") != before
    losses.write_text(text.replace("return ", "return 0 + ", 1))
    assert rehash("pipeline.models.losses") != before


def test_the_closure_follows_lazy_imports_but_not_type_checking_ones(package):
    assert "pipeline.data.stream" in fingerprints.imports("pipeline.data.datasets")       # inside a function
    assert "pipeline.data" in fingerprints.imports("pipeline.data.datasets")              # its parent package
    stream = fingerprints.imports("pipeline.data.stream")
    closure = fingerprints.closure(["pipeline.stages.evaluation.knn"])
    assert "pipeline.evaluation.probes" in closure and "pipeline.models.losses" not in closure
    assert {"pipeline", "pipeline.stages", "pipeline.stages.evaluation"} <= set(closure)
    mae = fingerprints.closure(["pipeline.methods.mae"])
    assert "pipeline.methods.sdae" not in mae and "pipeline.models.masking" in mae
    (package / "data/stream.py").write_text((package / "data/stream.py").read_text() + (
        "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.train import engine\n"))
    fingerprints.forget()
    assert fingerprints.imports("pipeline.data.stream") == stream                       # annotations only
    with pytest.raises(KeyError, match="not a module"):
        fingerprints.closure(["pipeline.nowhere"])


def test_a_nodes_code_hash_follows_its_own_code_only(package):
    """code_hash (what a training node keys its resumable state with) changes with a statement of a module the node
    runs, and neither with another method's module nor with a docstring."""
    before = fingerprints.code_hash("pretrain@seed0-mae")
    assert before == fingerprints.code_hash("pretrain@seed1-mae")            # the seed is not code
    assert before != fingerprints.code_hash("pretrain@seed0-sdae")
    sdae, mae = package / "methods/sdae.py", package / "methods/mae.py"
    sdae.write_text(sdae.read_text() + "\nEDITED = True\n")
    mae.write_text(mae.read_text().replace('"""', '"""Reworded. ', 1))
    fingerprints.forget()
    assert fingerprints.code_hash("pretrain@seed0-mae") == before
    mae.write_text(mae.read_text() + "\nEDITED = True\n")
    fingerprints.forget()
    assert fingerprints.code_hash("pretrain@seed0-mae") != before


def test_a_method_module_is_in_its_own_nodes_code_only():
    params = config.load("tiny", check_paths=False)
    holders = {node.node_id(inst) for node, inst in dag.instances(params)
               if "pipeline.methods.sdae" in fingerprints.code(node, inst)}
    assert holders == {"pretrain@seed0-sdae"}


def test_refresh_writes_what_changed_and_dates_back_an_undone_edit(tmp_path, monkeypatch):
    from conftest import copy_dag

    copy_dag(tmp_path)
    monkeypatch.chdir(tmp_path)
    params = config.load("tiny", check_paths=False)
    assert len(fingerprints.refresh("tiny", params)) == len(dag.instances(params))
    assert fingerprints.refresh("tiny", params) == []                       # nothing changed: nothing written
    knn = fingerprints.path("knn@seed0-mae")
    first = knn.stat().st_mtime_ns
    node = dag.NODES["knn"]
    outputs = [Path(p) for paths in node.output_paths(params, {"seed": 0, "weights": "mae"}).values() for p in paths]
    output = outputs[0]                                                     # the node's outputs, built now
    output.parent.mkdir(parents=True)
    for out in outputs:
        out.write_text("{}")
    time.sleep(0.01)
    edited = config.load("tiny", ["knn.k=3"], check_paths=False)
    written = fingerprints.refresh("tiny", edited)
    assert "knn@seed0-mae" in written and "linprobe@seed0-mae" not in written
    assert json.loads(knn.read_text())["params"]["knn"]["k"] == 3
    assert knn.stat().st_mtime_ns > output.stat().st_mtime_ns               # Snakemake: rerun
    fingerprints.refresh("tiny", params)                                    # the edit undone, nothing rebuilt
    assert knn.stat().st_mtime_ns == first < output.stat().st_mtime_ns      # Snakemake: built with this, no rerun
    fingerprints.refresh("tiny", edited)
    time.sleep(0.01)
    for out in outputs:                                                     # rebuilt with k=3 ...
        out.write_text("{}")
        os.utime(out)
    fingerprints.refresh("tiny", params)                                    # ... then undone: rerun again
    assert knn.stat().st_mtime_ns > output.stat().st_mtime_ns


def test_a_fingerprint_holds_the_command_params_and_code_of_its_node():
    params = config.load("tiny", check_paths=False)
    node = dag.NODES["pretrain"]
    doc = fingerprints.fingerprint(params, "tiny", node, node.instance(params, {"seed": 0, "method": "rcmae"}))
    assert doc["command"] == "python -m pipeline.stages.training.pretrain --preset tiny --seed 0 --method rcmae"
    assert set(doc["params"]) == {"data", "model", "pretrain", "rcmae", "mae.norm_pix_loss"}
    assert {"pipeline.methods.rcmae", "pipeline.methods.mae", "pipeline.train.engine"} <= set(doc["code"])
