"""Layers: the package's modules import downward only, in the order LAYERS declares (lowest first). An import of a
module of a higher layer fails this test, at the top of a module or inside a function (a lazy import runs too);
only imports under `if TYPE_CHECKING:` (annotations, never run) are left out. Within one layer, any import.

The imports are read as the node fingerprints read them (pipeline.orchestration.fingerprints.imports), so the code a
node depends on is the code this order allows it to reach.
"""
from __future__ import annotations

import ast

import pytest
import yaml

from pipeline import config, methods
from pipeline.orchestration import fingerprints

# Lowest first. A layer is a list of module prefixes; "pipeline.methods" alone is the method registry (SPEC data, no
# torch), the method modules are a layer of their own, above the models and the training loop they build on.
LAYERS = [
    ["pipeline", "pipeline.errors"],                # the package, its one exception type
    ["pipeline.methods"],                           # the registry: each method's SPEC, read from its source
    ["pipeline.layout"],                            # every path and node id
    ["pipeline.checkpoint"],                        # atomic writes, safetensors, sidecars
    ["pipeline.config"],                            # params: load, validate, seeds
    ["pipeline.dag"],                               # the node table
    ["pipeline.ranks", "pipeline.hardware", "pipeline.plots",    # processes, device and precision, figures,
     "pipeline.settings"],                                      # the typed settings a node resolves from params
    ["pipeline.models"],
    ["pipeline.data"],
    ["pipeline.train"],
    ["pipeline.methods.*"],                         # one module per method
    ["pipeline.evaluation"],
    ["pipeline.reporting"],
    ["pipeline.orchestration"],
    ["pipeline.stages"],
    ["pipeline.bench"],
]


def layer(module: str) -> int:
    """The index of the module's layer: the longest prefix that matches (pipeline.methods.mae: the method modules)."""
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix.endswith(".*"):
                hit = module.startswith(prefix[:-1]) and len(prefix)
            else:
                hit = (module == prefix or (prefix != "pipeline" and module.startswith(prefix + "."))) and len(prefix)
            if hit and hit > best:
                best, found = hit, i
    assert found is not None, f"{module} is in no layer of LAYERS"
    return found


def modules() -> list[str]:
    names = []
    for path in sorted(fingerprints.PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(fingerprints.PACKAGE.parent).with_suffix("").parts)
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def upward(module: str) -> list[str]:
    mine = layer(module)
    return [f"{module} (layer {mine}) imports {m} (layer {layer(m)})" for m in sorted(fingerprints.imports(module))
            if layer(m) > mine]


def test_every_module_imports_downward_only():
    problems = [p for m in modules() for p in upward(m)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module, target", [("pipeline.models.losses", "pipeline.train.distributed"),
                                            ("pipeline.config", "pipeline.stages.evaluation.knn"),
                                            ("pipeline.data.stream", "pipeline.train.engine")])
def test_an_upward_import_inside_a_function_fails(module, target, tmp_path, monkeypatch):
    """The check sees a lazy import: an upward one added inside a function of a copy of the package fails it."""
    import shutil

    copy = tmp_path / "pipeline"
    shutil.copytree(fingerprints.PACKAGE, copy)
    file = copy.joinpath(*module.split(".")[1:]).with_suffix(".py")
    file.write_text(file.read_text() + f"\n\ndef _late():\n    import {target}  # noqa\n")
    monkeypatch.setattr(fingerprints, "PACKAGE", copy)
    fingerprints.forget()
    try:
        assert any(target in p for p in upward(module))
    finally:
        fingerprints.forget()


# Params enter once: each node resolves its settings at its boundary (its stage CLI, pipeline.settings) and the library
# below takes explicit arguments. These layers never read the params dict nor name one of its sections; a method
# module's `build` and `forward_flops` are its boundary (they turn its params section into arguments).
BELOW_THE_BOUNDARY = ("pipeline.models", "pipeline.data", "pipeline.train", "pipeline.evaluation", "pipeline.methods.")
METHOD_BOUNDARY = ("build", "forward_flops")
SIDECAR = "meta"     # an encoder file's sidecar records its own "model" config


def params_reads(source: str, module: str) -> list[str]:
    """Where `source` reads params below the boundary: a subscript or .get of a params section's name (on anything
    but a sidecar), or any use of a name `params` other than handing it on whole as a call's argument."""
    sections = set(yaml.safe_load(config.BASE.read_text())) | set(methods.NAMES) | {"seed"}
    tree = ast.parse(source)
    exempt = set()
    if module.startswith("pipeline.methods."):
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name in METHOD_BOUNDARY:
                exempt |= {id(n) for n in ast.walk(node)}
    passed = {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call) for a in n.args}
    out = []
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        key, receiver = (node.slice, node.value) if isinstance(node, ast.Subscript) else (None, None)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "get" and node.args:
            key, receiver = node.args[0], node.func.value
        if isinstance(key, ast.Constant) and key.value in sections and getattr(receiver, "id", None) != SIDECAR:
            out.append(f"{module}:{node.lineno} reads section {key.value!r}: {ast.unparse(node)}")
        elif isinstance(node, ast.Name) and node.id == "params" and id(node) not in passed:
            out.append(f"{module}:{node.lineno} uses params: {ast.unparse(node)}")
    return out


def test_the_library_below_the_boundary_reads_no_params():
    problems = []
    for module in modules():
        if module.startswith(BELOW_THE_BOUNDARY):
            path = fingerprints.PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")
            if not path.is_file():
                path = path.with_suffix("") / "__init__.py"
            problems += params_reads(path.read_text(), module)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("line", ['x = params["pretrain"]["mask_ratio"]', 'x = cfg["model"]', 'x = d.get("launch")',
                                  "x = params", "x = params.copy()"])
def test_a_params_read_below_the_boundary_fails(line):
    """A method class reading params (or any section) outside its module's build fails the check; build may."""
    source = f"def build(params):\n    {line}\n\n\nclass M:\n    def __init__(self, params, cfg, d):\n        {line}\n"
    assert {p.split(":")[1].split()[0] for p in params_reads(source, "pipeline.methods.toy")} == {"7"}
    assert params_reads("def f(params):\n    return g(params)\n", "pipeline.models.x") == []    # handed on whole
    assert params_reads('y = meta["model"]\n', "pipeline.models.x") == []                      # a sidecar's config
