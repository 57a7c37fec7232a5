"""Module boundaries: no module under pipeline/ uses another pipeline module's private names (a leading underscore,
not a dunder), neither `from pipeline.x import _name` nor `x._name` on an imported pipeline module. What one module
needs from another is a public, documented function of it (issue 18, item 7)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(source: str, me: str) -> list[str]:
    """`line: what` for each private name of another pipeline module that `source` (module `me`) uses."""
    tree, aliases, out = ast.parse(source), {}, []
    package = me if _is_module(f"{me}.__init__") else me.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                                       # relative: from .x import y
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "pipeline":
                continue
            for a in node.names:
                if _is_module(f"{base}.{a.name}"):
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
                elif _private(a.name) and base != me:
                    out.append(f"{node.lineno}: from {base} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "pipeline":
                    aliases[a.asname or "pipeline"] = a.name if a.asname else "pipeline"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in aliases:
                target = ".".join([aliases[value.id], *reversed(chain)])
                if _is_module(target) and target != me:
                    out.append(f"{node.lineno}: {target}.{node.attr}")
    return out


def test_no_module_uses_another_modules_private_names():
    found = [f"{path.relative_to(ROOT)}:{v}" for path in sorted((ROOT / "pipeline").rglob("*.py"))
             for v in violations(path.read_text(), _module_name(path))]
    assert not found, "private names used across pipeline modules (make them public):\n" + "\n".join(found)


def test_the_check_sees_each_form():
    me = "pipeline.data.stream"
    assert violations("from pipeline.data.datasets import _root, split_folder", me) == [
        "1: from pipeline.data.datasets import _root"]
    assert violations("from pipeline.train import engine\nengine._step(1)", me) == ["2: pipeline.train.engine._step"]
    assert violations("import pipeline.train.engine as e\ne._step", me) == ["2: pipeline.train.engine._step"]
    assert violations("import pipeline.train.engine\npipeline.train.engine._step", me) == [
        "2: pipeline.train.engine._step"]
    assert violations("from . import datasets\ndatasets._root", me) == ["2: pipeline.data.datasets._root"]
    assert violations("from .datasets import _root", me) == ["1: from pipeline.data.datasets import _root"]
    # allowed: its own privates, dunders, privates of objects (not modules), other packages' privates
    assert violations("from pipeline.data.stream import _Files\nfrom pipeline import layout\nlayout.__doc__\n"
                      "from pipeline.data.datasets import Prepared\nPrepared._fields\nimport torch\ntorch._C", me) == []
