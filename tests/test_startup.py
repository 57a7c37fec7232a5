"""Start-up (the issue: a node imports only what it uses, when it uses it):

- every stage module imports no heavy package (torch, timm, mlflow, pandas, submitit, matplotlib) at import time,
  nor does loading and validating the params;
- stage_main writes the moment of the node's first own work into $MIM_STARTUP_MARK, even when the check fails;
- teacher_swap's numpy copy (pipeline.models.encoder_file) writes the file the torch path (load_encoder, truncated,
  save_encoder) wrote, byte for byte, and its layout of the plain timm ViTs is timm's;
- pipeline.bench.startup's summary, import costs and files, on made-up timings (the benchmark itself builds the
  whole tiny study: minutes).
"""
import json
import re
import subprocess
import sys
import time

import pytest
import timm
import torch
from conftest import ROOT, run_cli
from safetensors.torch import save_file

from pipeline import config, dag
from pipeline.bench import startup
from pipeline.checkpoint import read_json
from pipeline.dag import stage_module
from pipeline.errors import PipelineError
from pipeline.layout import sidecar
from pipeline.models import encoder_file
from pipeline.models.encoder import Encoder, build_encoder, load_encoder, save_encoder

HEAVY = ("torch", "timm", "mlflow", "pandas", "submitit", "matplotlib")
STAGES = sorted([*dag.NODES, *dag.HAND_RUN])                  # every node CLI
MODEL = dict(arch="vit_tiny_patch16_224", patch_size=2, embed_dim=32, depth=2, num_heads=2)
PARAMS = {"model": MODEL, "data": {"img_size": 8}}


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_module_imports_no_heavy_package(stage):
    code = f"import {stage_module(stage)}, sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_loading_and_validating_the_params_imports_no_heavy_package():
    """What stage_main does before the mark: the arch check knows the presets' timm names without timm."""
    code = f"from pipeline import config; import sys; config.load('tiny'); config.load('default'); " \
           f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_arch_outside_the_written_out_ones_is_still_checked_by_timm():
    assert config.load("tiny", ["model.arch=vit_giant_patch14_224"])["model"]["arch"] == "vit_giant_patch14_224"
    with pytest.raises(PipelineError, match="model.arch 'vit_nope' is not a timm model name"):
        config.load("tiny", ["model.arch=vit_nope"])


def test_the_startup_mark_is_written_before_the_check_even_when_it_fails(workdir):
    mark = workdir / "first_work.mark"
    start = time.time()
    proc = run_cli(sys.executable, "-m", "pipeline.stages.evaluation.knn", "--preset", "tiny",
                   "--weights", "random_init", check=False, env={"MIM_STARTUP_MARK": str(mark)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: missing input results/prepare_data/dataset.safetensors: "
                                   "run the node that makes it first")
    assert start < float(mark.read_text()) < time.time()


# ---- teacher_swap's copy without torch --------------------------------------------------------------------

def external(path, dtype: torch.dtype) -> None:
    """A bare timm ViT state dict (no sidecar) in `dtype`, wider and deeper than MODEL."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=8, in_chans=1,
                            patch_size=2, embed_dim=64, depth=3, num_heads=1)
    save_file({k: v.to(dtype) for k, v in vit.state_dict().items()}, str(path))


SOURCES = {       # name -> (write the source file, the depth teacher_swap keeps or None)
    "study_encoder": (lambda p: save_encoder(p, build_encoder(MODEL, 8, 1, seed=3), {"node": "random_init"}), None),
    "cut_to_depth_0": (lambda p: save_encoder(p, build_encoder(MODEL, 8, 1, seed=3), {"node": "random_init"}), 0),
    "cut_to_depth_1": (lambda p: save_encoder(p, build_encoder(MODEL, 8, 1, seed=3), {"node": "random_init"}), 1),
    "external_fp16": (lambda p: external(p, torch.float16), None),
    "external_bf16": (lambda p: external(p, torch.bfloat16), None),       # numpy has no bf16: read through torch
    "other_arch": (lambda p: save_encoder(p, build_encoder(dict(MODEL, arch="vit_giant_patch14_224"), 8, 1, seed=3),
                                          {}), None),                  # no written-out layout: timm builds it
}


@pytest.mark.parametrize("source", SOURCES)
def test_the_numpy_copy_writes_the_file_the_torch_path_wrote(tmp_path, source):
    make, depth = SOURCES[source]
    src, by_torch, by_numpy = (tmp_path / "src.safetensors", tmp_path / "torch.safetensors",
                               tmp_path / "numpy.safetensors")
    make(src)
    provenance = {"node": "teacher_swap", "source": str(src)}

    enc, _ = load_encoder(src, PARAMS["model"], 1, PARAMS["data"]["img_size"])       # the torch path, as it was
    enc = enc if depth is None else enc.truncated(depth)
    save_encoder(by_torch, enc, provenance)
    arrays, model, _ = encoder_file.load(src, PARAMS["model"], 1, PARAMS["data"]["img_size"])   # the numpy path
    if depth is not None:
        arrays, model = encoder_file.truncated(arrays, model, depth)
    encoder_file.save(by_numpy, arrays, model, provenance)

    assert by_numpy.read_bytes() == by_torch.read_bytes()
    made, expected = read_json(sidecar(by_numpy)), read_json(sidecar(by_torch))
    assert made == dict(expected, file=by_numpy.name)
    loaded, _ = load_encoder(by_numpy, PARAMS["model"], 1, PARAMS["data"]["img_size"])
    assert loaded.config == enc.config
    state = enc.vit.state_dict()
    assert loaded.vit.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.vit.state_dict().items())


@pytest.mark.parametrize("arch", sorted(encoder_file.PLAIN_VITS))
def test_the_written_out_layout_of_each_plain_vit_is_timms(arch):
    for model in (dict(MODEL, arch=arch), dict(MODEL, arch=arch, depth=0, embed_dim=48, num_heads=3, patch_size=4)):
        encoder = Encoder(model, 12, 3)
        expected = {k: tuple(v.shape) for k, v in encoder.vit.state_dict().items()}
        assert encoder_file.plain_vit_state(encoder.config) == expected
        assert all(v.dtype == torch.float32 for v in encoder.vit.state_dict().values())   # load's arrays: float32


def test_the_numpy_load_refuses_what_load_encoder_refuses(tmp_path):
    path = tmp_path / "t.safetensors"
    save_encoder(path, build_encoder(MODEL, 8, 1, seed=0), {})
    meta = read_json(sidecar(path))
    for load in (load_encoder, encoder_file.load):
        with pytest.raises(PipelineError, match="takes 1-channel 8px images, but the data has 3-channel 8px"):
            load(path, PARAMS["model"], 3, PARAMS["data"]["img_size"])
    (tmp_path / "t.json").write_text(json.dumps(dict(meta, model=dict(MODEL, depth=3, img_size=8, in_chans=1))))
    for load in (load_encoder, encoder_file.load):
        with pytest.raises(PipelineError, match="does not fit the encoder architecture: missing: blocks.2."):
            load(path, PARAMS["model"], 1, PARAMS["data"]["img_size"])
    (tmp_path / "t.json").write_text(json.dumps(dict(meta, model=dict(MODEL, num_heads=5, img_size=8, in_chans=1))))
    for load in (load_encoder, encoder_file.load):                    # timm refuses it: the same message
        with pytest.raises(PipelineError, match="cannot build the encoder its metadata describes"):
            load(path, PARAMS["model"], 1, PARAMS["data"]["img_size"])


# ---- the benchmark's summary --------------------------------------------------------------------------------

IMPORTTIME = """import time: self [us] | cumulative | imported package
import time:       100 |        100 |       torch._C
import time:       300 |        400 |     torch
import time:        50 |         50 |     timm.layers
import time:       200 |        650 |   timm
import time:        10 |        660 | pipeline.models.encoder
import time:        20 |         20 | yaml
"""


def test_import_costs_are_by_top_level_package_outermost_imports_only():
    costs = {c["package"]: c for c in startup.import_costs(IMPORTTIME)}
    assert [c["package"] for c in startup.import_costs(IMPORTTIME)] == ["pipeline", "timm", "torch", "yaml"]
    assert costs["torch"] == {"package": "torch", "cumulative_us": 400, "self_us": 400}
    assert costs["timm"] == {"package": "timm", "cumulative_us": 650, "self_us": 250}
    assert costs["pipeline"]["cumulative_us"] == 660 and costs["yaml"]["cumulative_us"] == 20


def test_the_summary_names_the_targets_and_whether_they_are_met(tmp_path):
    runs = {node: [{"to_first_work_s": 0.5 + i / 4, "total_s": 2.0 + i} for i in range(3)]
            for node in startup.NODES}
    runs["report"] = [{"to_first_work_s": 2.5, "total_s": 9.0}] * 3
    warm = [{"to_first_work_s": 0.3, "total_s": 1.0 + i} for i in range(3)]
    nodes = [{"node": node, **startup.median_times(r), **startup.median_times(warm, "warm_"), "runs": 3}
             for node, r in runs.items()]
    machine = {"class": "cpu-avx2", "cpu": "CPU capability AVX2", "model": "AMD EPYC", "cpu_capability": "AVX2",
               "cores": 2, "python": "3.11", "load_average": [0.1, 0.2, 0.3]}
    result = startup.summarise(nodes, startup.import_costs(IMPORTTIME), machine, 3, tiny_study_s=80.0)
    assert [n["node"] for n in result["nodes"]] == list(startup.NODES)
    assert next(n for n in result["nodes"] if n["node"] == "knn") == {
        "node": "knn", "to_first_work_s": 0.75, "total_s": 3.0, "warm_to_first_work_s": 0.3, "warm_total_s": 2.0,
        "runs": 3}
    assert result["met"] == {"to_first_work_s": False, "teacher_swap_total_s": True, "teacher_swap_warm_total_s": True,
                             "tiny_study_s": True, "slowest_to_first_work": "report"}
    assert result["targets"] == {"to_first_work_s": 2.0, "teacher_swap_total_s": 3.0, "tiny_study_s": 120.0}
    assert result["cpu_capability"] == "AVX2"
    startup.write(result, tmp_path)
    assert json.loads((tmp_path / "startup.json").read_text()) == result
    md = re.sub(r" +", " ", (tmp_path / "startup.md").read_text())   # table cells padded to their column's width
    assert ("| knn | 0.75 | 3.00 | 0.30 | 2.00 |" in md and "warm nodes) <= 120 s: met (80 s)" in md
            and "| timm | 0.00 | 0.00 |" in md)
    assert ("for every node: NOT met (slowest: report, 2.50 s)" in md
            and "in all <= 3.0 s: cold met (3.00 s), warm met (2.00 s)" in md)
    assert "about to call its check()" in md and "cpu-avx2" in md


def test_every_node_type_is_measured_on_a_node_of_the_tiny_study():
    """One example per entry of the node table, run as its rule runs it (its CLI and arguments)."""
    from pipeline import config, dag

    params = config.load("tiny", check_paths=False)
    assert list(startup.NODES) == list(dag.NODES)
    for name, (stage, *args) in startup.NODES.items():
        node = dag.NODES[name]
        assert stage == name and startup.command(name)[1:3] == ["-m", stage_module(name)]
        assert any(node.args(i) == args for i in node.instances(params)), name


def test_the_study_build_copies_what_the_repository_has():
    assert startup.REPOSITORY == ROOT
    assert all((startup.REPOSITORY / name).exists() for name in startup.DAG_FILES)
