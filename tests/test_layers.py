"""Layers: the package's modules import downward only, in the order LAYERS declares (lowest first). An import of a
module of a higher layer fails this test, at the top of a module or inside a function (a lazy import runs too);
only imports under `if TYPE_CHECKING:` (annotations, never run) are left out. Within one layer, any import.

The imports are read as the node fingerprints read them (pipeline.orchestration.fingerprints.imports), so the code a
node depends on is the code this order allows it to reach.
"""
from __future__ import annotations

import pytest

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
    ["pipeline.ranks", "pipeline.hardware", "pipeline.plots"],   # processes, device and precision, figures
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
