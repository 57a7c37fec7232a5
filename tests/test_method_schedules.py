"""Per-method schedules: a single-stage method's `<method>.pretrain` sets any pretrain key for its own training node
(pipeline.config.method_params), as a dBOT stage's entry does for that stage; the rest of the study keeps pretrain.*.
The node trains on them and declares what it reads; the kept encoders follow the method's own epochs."""
import json
from argparse import Namespace

import pytest

from pipeline import config, dag, layout, methods
from pipeline.errors import PipelineError
from pipeline.orchestration import dvc_yaml, params_reads
from pipeline.stages.training import prepare_data, pretrain
from pipeline.train import engine

OWN = ["--set", "sdae.pretrain={epochs: 1, blr: 1.0e-3, clip_grad: null, weight_decay: 0.04}",
       "--set", "pretrain.keep_every_epochs=null"]


def test_a_method_trains_on_its_own_schedule_and_reads_what_it_declares(workdir, monkeypatch):
    monkeypatch.setenv(params_reads.ENV, str(workdir / "reads"))
    configs, train = {}, engine.train

    def recording(model, data, cfg, run):
        configs[cfg.desc] = cfg
        return train(model, data, cfg, run)

    monkeypatch.setattr(engine, "train", recording)
    prepare_data.main(["--preset", "tiny", *OWN])
    for method in ("sdae", "mae"):
        pretrain.main(["--preset", "tiny", "--method", method, *OWN])
    sdae, mae = configs[layout.pretrain_node("sdae", 0)], configs[layout.pretrain_node("mae", 0)]
    tiny = config.load("tiny")["pretrain"]
    assert (sdae.epochs, sdae.lr, sdae.clip_grad, sdae.weight_decay) == (1, 1.0e-3 * 128 / 256, None, 0.04)
    assert (mae.epochs, mae.lr, mae.clip_grad, mae.weight_decay) == (
        tiny["epochs"], tiny["blr"] * 128 / 256, tiny["clip_grad"], tiny["weight_decay"])
    history = json.loads((layout.pretrain_dir("sdae", 0) / "metrics.json").read_text())["epochs"]
    assert len(history) == 1
    for method in ("sdae", "mae"):
        node = layout.pretrain_node(method, 0)
        reads = json.loads((workdir / "reads" / f"{node}.json").read_text())
        assert not params_reads.problems(reads, dag.declared("pretrain", method=method)), node
    sdae_reads = json.loads((workdir / "reads" / f"{layout.pretrain_node('sdae', 0)}.json").read_text())
    assert "sdae.pretrain" in sdae_reads["work"]


def test_a_dbot_stage_sets_any_pretrain_key_for_itself():
    params = config.load("tiny", ["dbot.stages.stage1={epochs: 3, blr: 1.0e-3, clip_grad: 1.0, warmup_epochs: 0}"])
    one, zero = (pretrain.settings(params, Namespace(method="dbot", stage=f"random_stage{k}")) for k in (1, 0))
    assert (one["epochs"], one["blr"], one["clip_grad"], one["warmup_epochs"]) == (3, 1.0e-3, 1.0, 0)
    assert (zero["clip_grad"], zero["warmup_epochs"]) == (params["pretrain"]["clip_grad"],
                                                         params["pretrain"]["warmup_epochs"])
    assert config.method_params(params, "mae") is params          # no own keys: the study's params themselves


def test_kept_encoders_follow_the_methods_own_epochs():
    """Every single-stage method at 4 epochs of its own (pretrain.epochs stays 2): each keeps epochs 1-3, in both
    DAGs' outputs; one method apart from the others is an error before any work (one rule declares the files)."""
    own = [f"{m}.pretrain={{epochs: 4}}" for m in layout.SINGLE_STAGE_METHODS]
    params = config.load("tiny", own)
    assert params["pretrain"]["epochs"] == 2
    assert all(layout.kept_epochs(params, m) == [1, 2, 3] for m in layout.SINGLE_STAGE_METHODS)
    outs = dvc_yaml.stages(params)["pretrain"]["do"]["outs"]
    assert "results/seed${item.seed}/pretrain/${item.method}/checkpoints/epoch3.safetensors" in outs
    with pytest.raises(PipelineError, match=r"^invalid params .*: rcmae\.pretrain: the single-stage methods keep "
                                            r"their encoder after the same epochs .*: rcmae \[1\], mae \[1, 2, 3\]"):
        config.load("tiny", own[:2] + ["rcmae.pretrain={epochs: 2}"] + own[3:])


@pytest.mark.parametrize("override, message", [
    ("sdae.pretrain={epoch: 3}", r"sdae\.pretrain: Additional properties are not allowed \('epoch' was unexpected\)"),
    ("bootmae.pretrain={batch_size: 0}", r"bootmae\.pretrain\.batch_size: 0 is less than the minimum of 1"),
    ("rcmae.pretrain={mask_ratio: 0.999}", r"rcmae\.pretrain\.mask_ratio 0\.999 leaves no visible patch of 16"),
    ("dbot.stages.stage1.crop_scale=[0.9, 0.2]", r"dbot\.stages\.stage1\.crop_scale \[0\.9, 0\.2\] must be"),
    ("supervised.pretrain={epochs: 3}", r"supervised: Additional properties are not allowed"),
])
def test_a_bad_own_schedule_is_a_one_line_error_naming_the_key(override, message):
    with pytest.raises(PipelineError, match=message) as err:
        config.load("tiny", [override])
    assert "\n" not in str(err.value)


def test_a_method_without_a_params_section_has_no_own_schedule():
    """A method module whose params section is absent (a new method before its section is written) or null sets no
    pretrain key of its own: the study's pretrain.* apply."""
    for params in ({}, {"mae": None}, {"mae": {"mask_ratio": 0.75}}):
        assert methods.own_pretrain(params, "mae") == {}
    assert methods.own_pretrain({"mae": {"pretrain": {"epochs": 3}}}, "mae") == {"epochs": 3}
