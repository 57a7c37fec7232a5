"""Preset imagenet is each paper's own ViT-B/16 recipe: resolved, key by key, against tests/official_recipes.py (the
official values with the file each comes from). A changed value fails naming its source; a value the project does not
follow is a recorded deviation (its row's `ours` and `why`), pinned as well."""
import math

import pytest
from official_recipes import RECIPES, Row

from pipeline import config, layout
from pipeline.models.ema import momentum_from_tau
from pipeline.models.masking import max_block_patches

IMAGENET_TRAIN = 1_281_167          # ImageNet-1k train images: the steps per epoch of a per-step EMA
METHODS = ("mae", "dbot", "sdae", "rcmae", "bootmae")
# every method states each of these (shared by none by accident: one method's recipe is not another's)
EVERY_METHOD = ("pretrain.epochs", "pretrain.batch_size", "pretrain.blr", "pretrain.weight_decay",
                "pretrain.warmup_epochs", "pretrain.min_lr", "pretrain.clip_grad", "model.num_heads",
                "model.decoder_heads")


@pytest.fixture(scope="module")
def params():
    return config.load("imagenet", check_paths=False)


def views(params: dict, method: str) -> list[dict]:
    """The params each training node of `method` sees (dBOT: one per stage); `eval`: the study's."""
    if method == "eval":
        return [params]
    stages = layout.dbot_stages(params) if method == "dbot" else [0]
    return [config.method_params(params, method, k) for k in stages]


def _ema(view: dict, method: str) -> list[float]:
    """The EMA momenta per update at the schedule's points (tau_epochs; None = 1): per epoch, or per optimiser step
    of ImageNet at the node's batch size."""
    spec = view[method]["momentum"]
    updates = 1 if spec["update"] == "epoch" else IMAGENET_TRAIN // view["pretrain"]["batch_size"]
    return [momentum_from_tau(t, updates) for t in spec["tau_epochs"]]


def _patches(view: dict) -> int:
    return (view["data"]["img_size"] // view["model"]["patch_size"]) ** 2


DERIVED = {
    "=stages": lambda v, m: len(v["dbot"]["stages"]),
    "=stage0_teacher_depth": lambda v, m: (v["model"]["depth"] if v["dbot"]["stage0_teacher_depth"] is None
                                           else v["dbot"]["stage0_teacher_depth"]),
    "=ema": _ema,
    "=ema_breakpoint_epochs": lambda v, m: [round(b * v["pretrain"]["epochs"])
                                            for b in v[m]["momentum"]["breakpoints"]],
    "=masked_patches": lambda v, m: _patches(v) - int(_patches(v) * (1 - v["pretrain"]["mask_ratio"])),
    "=block_patches": lambda v, m: int(_patches(v) * v[m]["block_ratio"]),
    "=max_block_patches": lambda v, m: max_block_patches(v[m]["max_block"], _patches(v)),
    "=feature_decoder_heads": lambda v, m: (v["model"]["num_heads"] if v[m]["feature_decoder"] == "encoder"
                                            else v["model"]["decoder_heads"]),
    "=decoder_depth": lambda v, m: v[m].get("decoder_depth", v["model"]["decoder_depth"]),
    "=linprobe_blr": lambda v, m: v["linprobe"]["lr"] * 256 / v["linprobe"]["batch_size"],
}


def value(view: dict, row: Row):
    if row.key.startswith("="):
        return DERIVED[row.key](view, row.method)
    out = view
    for part in row.key.split("."):
        out = out[part]
    return out


def same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and not isinstance(a, bool) and not isinstance(b, bool) \
            and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("row", RECIPES, ids=[f"{r.method}:{r.key}" for r in RECIPES])
def test_the_imagenet_preset_resolves_to_the_official_recipe(params, row):
    expected = row.ours if row.why else row.official
    for view in views(params, row.method):
        got = value(view, row)
        if row.why:
            what = f"the recorded deviation {expected!r} from the official {row.official!r} ({row.source}): {row.why}"
        else:
            what = f"the official {expected!r} ({row.source})"
        assert same(got, expected), f"imagenet {row.method} {row.key}: resolves to {got!r}, not {what}"


def test_every_method_states_its_own_schedule_heads_and_regularisation():
    rows = {(r.method, r.key) for r in RECIPES}
    missing = [(m, k) for m in METHODS for k in EVERY_METHOD if (m, k) not in rows]
    missing += [(m, f"{m}.drop_path") for m in METHODS if m != "bootmae" and (m, f"{m}.drop_path") not in rows]
    assert not missing, missing
    assert all(r.source.split()[0] in (*METHODS, "boot") for r in RECIPES), "a row without its repository"
    assert len({(r.method, r.key) for r in RECIPES}) == len(RECIPES), "a (method, key) twice"


def test_every_value_the_preset_sets_for_a_method_has_its_row(params):
    """Each key under a method's section of params/presets/imagenet.yaml is in the table (or feeds a derived row)."""
    import yaml

    preset = yaml.safe_load(open("params/presets/imagenet.yaml"))
    feeds = {"tau_epochs": "=ema", "breakpoints": "=ema_breakpoint_epochs", "block_ratio": "=block_patches",
             "max_block": "=max_block_patches", "stage0_teacher_depth": "=stage0_teacher_depth",
             "decoder_depth": "=decoder_depth"}
    rows = {(r.method, r.key) for r in RECIPES}

    def leaves(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}.{k}")
            else:
                yield f"{prefix}.{k}", k

    missing = []
    for method in METHODS:
        for path, leaf in leaves(preset.get(method, {}), method):
            key = path.replace(f"{method}.pretrain.", "pretrain.")
            if key.startswith("dbot.stages."):          # a stage's keys are pretrain keys; a stage left out: =stages
                key = "=stages" if key.count(".") == 2 else f"pretrain.{leaf}"
            if key.startswith("dbot.chains."):
                key = "dbot.chains"
            if (method, key) not in rows and (method, feeds.get(leaf, "")) not in rows:
                missing.append(path)
    assert not missing, missing


def test_the_five_methods_train_their_own_schedules(params):
    """One preset, five recipes: the epochs, batch and lr each training node of the imagenet study gets."""
    from argparse import Namespace

    from pipeline.stages.training.pretrain import settings

    got = {m: settings(params, Namespace(method=m, stage=None)) for m in ("mae", "sdae", "rcmae", "bootmae")}
    got.update({k: settings(params, Namespace(method="dbot", stage=k)) for k in layout.dbot_keys(params)})
    assert {k: (s["epochs"], s["batch_size"], s["clip_grad"]) for k, s in got.items()} == {
        "mae": (1600, 4096, None), "sdae": (300, 768, None), "rcmae": (1600, 4096, None), "bootmae": (800, 4096, None),
        "random_stage0": (800, 4096, 3.0), "random_stage1": (800, 4096, 3.0)}


def test_bootmae_decoder_depth_is_its_own_where_set():
    """bootmae.decoder_depth (absent: model.decoder_depth) sets both of BootMAE's decoders and their FLOPs; the other
    methods keep model.decoder_depth."""
    from pipeline.methods import METHODS
    from pipeline.models.flops import flops_per_image

    study = config.load("tiny", ["model.decoder_depth=1"])
    own = config.load("tiny", ["model.decoder_depth=1", "bootmae.decoder_depth=3"])
    boot = METHODS["bootmae"](own, 1, 0)
    assert len(boot.pixel_decoder.blocks) == len(boot.feature_decoder.blocks) == 3
    assert len(METHODS["mae"](own, 1, 0).decoder.blocks) == 1
    assert flops_per_image(own, "bootmae")["train"] > flops_per_image(study, "bootmae")["train"]
    assert flops_per_image(own, "mae") == flops_per_image(study, "mae")
    assert "decoder_depth" not in study["bootmae"]          # the default study's params stay as they were
