"""The node table (pipeline/dag.py) is the one place a node is described: its instances, inputs, outputs, params and
command, for both DAGs and the report. A toy evaluation node, added to a copy of the repository as its CLI module
plus one table entry (and its params section), joins the Snakefile, dvc.yaml and the report's inputs, and runs."""
import json
import re

import pytest
from conftest import run_cli

from pipeline import config, dag, layout

TOY_ENTRY = ('    Node("toyprobe", "evaluation", ("seed", "weights"), _per_weights(layout.probe_weights), '
             '_encoder_inputs,\n         _evaluation_outputs("toyprobe"), ("data", "toyprobe"), tabulated=True),\n')


def add_toy_node(root):
    """What docs/adding-a-method-or-node.md's node part asks for: pipeline/stages/evaluation/toyprobe.py (the knn CLI
    under another name, reading its own params section), its entry in the node table, its params and schema."""
    knn = (root / "pipeline/stages/evaluation/knn.py").read_text()
    toy = knn.replace('"knn"', '"toyprobe"').replace('params["knn"]', 'params["toyprobe"]')
    toy = toy.replace('node_id("knn"', 'node_id("toyprobe"')
    assert toy.count("toyprobe") >= 3
    (root / "pipeline/stages/evaluation/toyprobe.py").write_text(toy)
    table = root / "pipeline/dag.py"
    text = table.read_text()
    anchor = '    Node("report", "evaluation"'
    assert text.count(anchor) == 1
    table.write_text(text.replace(anchor, TOY_ENTRY + anchor))
    with open(root / "params/base.yaml", "a") as f:
        f.write("\ntoyprobe: {k: 3, temperature: 0.07, feature: cls, precision: fp32}\n")
    schema = root / "params/schema.yaml"
    text = schema.read_text()
    block = re.search(r"\n  knn:\n(    .*\n)+", text).group(0)
    schema.write_text(text.replace(block, block + block.replace("  knn:", "  toyprobe:"), 1))


def test_every_node_has_its_cli_module_and_its_outputs_under_results():
    params = config.load("default", check_paths=False)
    for node, inst in dag.instances(params):
        assert (layout.RESULTS.parent / (node.module.replace(".", "/") + ".py")).is_file(), node.name
        outputs = [p for paths in node.output_paths(params, inst).values() for p in paths]
        assert outputs and all(p.startswith("results/") and "{" not in p for p in outputs), node.node_id(inst)
        assert dag.parse_node_id(node.node_id(inst)) == (node, {w: inst[w] for w in node.wildcards})


def test_no_two_nodes_write_the_same_file():
    params = config.load("tiny", check_paths=False)
    seen = {}
    for node, inst in dag.instances(params):
        for p in [p for paths in node.output_paths(params, inst).values() for p in paths]:
            assert p not in seen, f"{p}: {seen.get(p)} and {node.node_id(inst)}"
            seen[p] = node.node_id(inst)


def test_every_input_is_an_output_of_a_node_or_the_data():
    """The table's edges close: each input of each node is made by some node (what makes both DAGs one DAG)."""
    params = config.load("tiny", check_paths=False)
    made = {p for node, inst in dag.instances(params) for paths in node.output_paths(params, inst).values()
            for p in paths}
    for node, inst in dag.instances(params):
        for p in [p for paths in node.inputs(params, inst).values() for p in paths]:
            assert p in made, f"{node.node_id(inst)} reads {p}, which no node writes"


def test_unknown_node_names_and_ids_are_one_line_errors():
    with pytest.raises(KeyError, match="no node CLI named 'knnn'"):
        dag.stage_module("knnn")
    with pytest.raises(KeyError, match="not a node id"):
        dag.parse_node_id("knnn@seed0-mae")


@pytest.mark.e2e
def test_a_toy_evaluation_node_joins_both_dags_the_report_and_runs(workdir):
    add_toy_node(workdir)
    dry = run_cli("snakemake", "-n", "--forceall", "-p", "--config", "preset=tiny").stdout
    assert re.search(r"pipeline\.stages\.evaluation\.toyprobe --preset tiny --seed 0 --weights dbot_mae_stage2", dry)
    assert "results/seed0/toyprobe/pixels/metrics.json" in dry                      # every probed encoder + pixels
    dvc = run_cli("python", "-m", "pipeline.orchestration.dvc_yaml", "--preset", "tiny").stdout
    assert "  toyprobe:\n    foreach:" in dvc and "pipeline.stages.evaluation.toyprobe" in dvc
    assert "- toyprobe\n" in dvc                                                   # its params section, declared
    found = json.loads(run_cli("python", "-c", "import json; from pipeline import config, dag; "
                               "p = config.load('tiny', check_paths=False); "
                               "print(json.dumps(dag.NODES['report'].inputs(p, {})['evaluations']))").stdout)
    assert "results/seed0/toyprobe/mae/metrics.json" in found                      # the report tabulates it
    for cmd in (["prepare_data"], ["random_init", "--seed", "0"],
                ["toyprobe", "--seed", "0", "--weights", "random_init"]):
        group = "evaluation" if cmd[0] == "toyprobe" else "training"
        run_cli("python", "-m", f"pipeline.stages.{group}.{cmd[0]}", "--preset", "tiny", *cmd[1:])
    metrics = json.loads((workdir / "results/seed0/toyprobe/random_init/metrics.json").read_text())
    assert metrics["protocol"] == "toyprobe" and metrics["settings"]["k"] == 3 and 0 <= metrics["metrics"]["top1"] <= 1
    from pipeline.reporting.report import eval_rows

    rows = eval_rows(metrics, workdir / "results/seed0/toyprobe/random_init/metrics.json")
    assert {r["protocol"] for r in rows} == {"toyprobe"} and {r["metric"] for r in rows} >= {"top1"}
