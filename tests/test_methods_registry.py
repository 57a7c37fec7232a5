"""A method is one module (pipeline/methods/<name>.py: SPEC, build, forward_flops) plus its params section and
its entry in NAMES: a toy method added to a copy of the repository reaches both DAGs, the schema and checks,
FLOPs, plots and the report, with nothing else edited."""
import copy
import json
import math
import re
import subprocess
import sys

import pytest

from pipeline import config, methods
from pipeline.errors import PipelineError
from pipeline.models.flops import flops_per_image


def add_toy_method(root):
    """pipeline/methods/toy.py (MAE's module under another name, style, seed and params section), its NAMES
    entry and its params section: what docs/adding-a-method-or-node.md asks for."""
    src = (root / "pipeline/methods/mae.py").read_text()
    toy = (src.replace('"label": "MAE"', '"label": "Toy"').replace('"color": "tab:orange"', '"color": "tab:cyan"')
           .replace('"seed_offset": 500', '"seed_offset": 560').replace('params["mae"]', 'params["toy"]'))
    assert toy.count('"Toy"') == 1 and 'params["toy"]' in toy
    (root / "pipeline/methods/toy.py").write_text(toy)
    init = root / "pipeline/methods/__init__.py"
    init.write_text(init.read_text().replace('"bootmae", "supervised")', '"bootmae", "supervised", "toy")', 1))
    with open(root / "params/base.yaml", "a") as f:
        f.write("\ntoy:\n  norm_pix_loss: false\n  drop_path: 0.0\n")


CHECK = r"""
import json, torch
from pipeline import config, layout, methods, plots
from pipeline.errors import PipelineError
from pipeline.models.flops import flops_per_image
from pipeline.reporting.report import weights_key
p = config.load("tiny", check_paths=False)
try:
    config.load("tiny", ["toy.drop_path=2"], check_paths=False)
    rejected = ""
except PipelineError as e:
    rejected = str(e)
model = methods.METHODS["toy"](p, 1, config.node_seed(p, "toy"))
loss, out = model(torch.randn(2, 1, p["data"]["img_size"], p["data"]["img_size"]), torch.Generator().manual_seed(0))
print(json.dumps({"single_stage": layout.SINGLE_STAGE_METHODS, "schema": config.schema()["properties"]["toy"],
                  "rejected": rejected, "seed": config.node_seed(p, "toy"), "style": plots.BASELINE_STYLE["toy"],
                  "flops": flops_per_image(p, "toy"), "after_bootmae": weights_key("toy") > weights_key("bootmae"),
                  "loss": float(loss), "weights": layout.all_weights(p)}))
"""


def run(args, cwd):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_every_method_declares_a_valid_spec_and_its_flops():
    params = config.load("tiny", check_paths=False)
    for name in methods.NAMES:
        spec = methods.spec(name)
        assert set(spec) >= {"label", "color", "node", "teacher", "labels", "seed_offset", "at_most", "params"}
        assert set(params[name]) == set(spec["params"]), name          # base.yaml's section = the declared keys
        assert flops_per_image(params, name)["train"] > 0
    assert methods.with_node("pretrain") == ("mae", "sdae", "rcmae", "bootmae")
    assert methods.NEEDS_TEACHER == {"dbot"} and methods.NEEDS_LABELS == {"supervised"}
    assert methods.EMA_METHODS == {"sdae", "rcmae", "bootmae"}


def test_methods_are_built_once_on_first_use():
    """METHODS (name -> build) is made on first use, then kept as the module's attribute; other names are errors."""
    first = methods.METHODS
    assert vars(methods)["METHODS"] is first and list(first) == list(methods.NAMES)
    assert first["mae"] is methods.module("mae").build
    with pytest.raises(AttributeError, match="module 'pipeline.methods' has no attribute 'BUILDERS'"):
        _ = methods.BUILDERS


def test_a_new_method_module_reaches_the_dags_the_schema_and_the_report(workdir):
    add_toy_method(workdir)
    found = json.loads(run([sys.executable, "-c", CHECK], workdir).splitlines()[-1])
    assert found["single_stage"][-1] == "toy"
    assert found["schema"]["required"] == ["norm_pix_loss", "drop_path"]
    assert found["rejected"].startswith("invalid params") and "toy.drop_path" in found["rejected"]
    assert found["seed"] == 560 and found["style"] == ["Toy", "tab:cyan"] and found["after_bootmae"]
    assert found["flops"]["train"] > 0 and math.isfinite(found["loss"])       # not NaN, not inf
    assert "toy" in found["weights"]

    dry = run(["snakemake", "--dry-run", "--printshellcmds", "--forceall", "--config", "preset=tiny"], workdir)
    assert re.search(r"pipeline\.stages\.training\.pretrain .*--method toy", dry)
    for node in ("knn", "linprobe", "finetune", "checkpoint_eval"):
        assert re.search(rf"pipeline\.stages\.evaluation\.{node} .*--weights toy\b", dry), node
    report_inputs = dry[dry.index("rule report:"):]
    assert "results/seed0/knn/toy/metrics.json" in report_inputs           # the report reads its results

    dvc_yaml = run([sys.executable, "-m", "pipeline.orchestration.dvc_yaml", "--preset", "tiny"], workdir)
    assert "method: toy" in dvc_yaml and "results/seed${item.seed}/pretrain/${item.method}" in dvc_yaml


def test_a_method_section_that_is_not_a_mapping_or_lacks_a_key_is_a_one_line_error():
    """Every method's section is checked by its module's schema: a scalar in its place, or any key of its SPEC's
    params left out, is named in one line before any work."""
    params = config.load("tiny")
    for name in methods.NAMES:
        bad = dict(params, **{name: 5})
        with pytest.raises(PipelineError, match=rf"^invalid params \(params\): {name}: 5 is not of type 'object'$"):
            config.validate(bad, check_paths=False)
        for key in methods.spec(name)["params"]:
            bad = copy.deepcopy(params)
            del bad[name][key]
            with pytest.raises(PipelineError, match=rf"^invalid params \(params\): {name}: '{key}' is a required"):
                config.validate(bad, check_paths=False)
