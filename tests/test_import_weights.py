"""python -m pipeline.stages.training.import_weights: released checkpoints (MAE, DeiT, DINO, timm) as encoder files.

Each test builds a tiny checkpoint in the format's official layout from a timm VisionTransformer (patch 4,
width 32, depth 2, 2 heads, 16 px RGB), runs the real CLI in a copy of the repository, and checks the written
tensors, the sidecar's provenance and that pipeline.models.encoder.load_encoder accepts it; bad input is one
`error:` line, exit 2, nothing written."""
import argparse
import hashlib
import json
import os
import sys

import pytest
import timm
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from pipeline.dag import stage_module

SIZES = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, in_chans=3)
OUT = "results/imported/{}/encoder.safetensors"


def vit(seed=0, num_classes=0, **sizes):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                             **dict(SIZES, **sizes)).state_dict()


def encoder_state(seed=0, num_classes=0, **sizes):
    """What the import must write: the plain ViT's encoder keys (not its head), float32."""
    return {k: v for k, v in vit(seed, num_classes, **sizes).items() if not k.startswith("head.")}


def mae_decoder():
    return {"mask_token": torch.zeros(1, 1, 16), "decoder_pos_embed": torch.zeros(1, 17, 16),
            "decoder_embed.weight": torch.randn(16, 32), "decoder_embed.bias": torch.zeros(16),
            "decoder_blocks.0.norm1.weight": torch.ones(16), "decoder_norm.weight": torch.ones(16),
            "decoder_pred.weight": torch.randn(48, 16), "decoder_pred.bias": torch.zeros(48)}


def import_weights(*args, check=True):
    return run_cli(sys.executable, "-m", "pipeline.stages.training.import_weights", *args, "--preset", "tiny",
                   check=check)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_written(workdir, out, expected, source, fmt):
    """The encoder file holds `expected` exactly, its sidecar the provenance, and the repo's loaders take it."""
    from pipeline import config
    from pipeline.models import encoder_file
    from pipeline.models.encoder import load_encoder

    got = load_file(str(workdir / out))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    meta = json.loads((workdir / out).with_suffix(".json").read_text())
    assert meta["node"] == "import_weights" and meta["format"] == fmt
    assert meta["source"] == str(source.resolve()) and meta["source_sha256"] == sha256(source)
    assert meta["sha256"] == sha256(workdir / out)
    assert {k: meta["model"][k] for k in SIZES} == SIZES
    params = config.load("tiny")
    enc, loaded_meta = load_encoder(workdir / out, params["model"], 3, 16)
    assert loaded_meta == meta and enc.config["embed_dim"] == 32
    assert all(torch.equal(enc.vit.state_dict()[k], expected[k]) for k in expected)
    arrays, _, _ = encoder_file.load(workdir / out, params["model"], 3, 16)       # teacher_swap's loader
    assert arrays.keys() == expected.keys()
    return meta


def check_refused(proc, workdir, *words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not (workdir / "results" / "imported").exists()


def test_mae_release_layout_drops_the_decoder(workdir):
    source = workdir / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": vit() | mae_decoder()}, source)
    proc = import_weights(str(source), "--format", "mae")
    meta = check_written(workdir, OUT.format("mae_pretrain_vit_tiny"), encoder_state(), source, "mae")
    assert meta["mapping"]["dropped_groups"] == {"decoder": 8} and meta["mapping"]["renamed"] == 0
    assert meta["entry"] == "model" and meta["mapping"]["kept"] == len(encoder_state())
    assert meta["num_heads_from"].startswith("params")      # width 32 = the tiny preset's, its 2 heads
    assert "as a dBOT stage-0 teacher of preset tiny it needs" in proc.stdout     # 16 px RGB, not 8 px grey


def test_mae_full_training_checkpoint_with_args_namespace(workdir):
    source = workdir / "checkpoint-799.pth"
    torch.save({"model": vit() | mae_decoder(), "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
                "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75)}, source)
    out = workdir / "mae.safetensors"
    import_weights(str(source), "--format", "mae", "--out", str(out), "--num-heads", "2")
    meta = check_written(workdir, out, encoder_state(), source, "mae")
    assert meta["num_heads_from"] == "--num-heads"


def test_deit_release_layout_drops_the_head(workdir):
    source = workdir / "deit_tiny_patch4.pth"
    torch.save({"model": vit(num_classes=10)}, source)
    import_weights(str(source), "--format", "deit")
    meta = check_written(workdir, OUT.format("deit_tiny_patch4"), encoder_state(num_classes=10), source, "deit")
    assert meta["mapping"]["dropped_groups"] == {"head": 2}


def distilled_deit():
    state = vit(num_classes=10)
    pos = state["pos_embed"]
    state["pos_embed"] = torch.cat([pos[:, :1], torch.randn(1, 1, 32), pos[:, 1:]], dim=1)     # cls, dist, patches
    return {"model": state | {"dist_token": torch.randn(1, 1, 32), "head_dist.weight": torch.randn(10, 32),
                              "head_dist.bias": torch.zeros(10)}}


def test_distilled_deit_is_refused_unless_its_dist_token_is_dropped(workdir):
    source = workdir / "deit_distilled.pth"
    torch.save(distilled_deit(), source)
    check_refused(import_weights(str(source), "--format", "deit", check=False), workdir, "dist_token",
                  "--drop-dist-token")
    import_weights(str(source), "--format", "deit", "--drop-dist-token")
    meta = check_written(workdir, OUT.format("deit_distilled"), encoder_state(num_classes=10), source, "deit")
    assert meta["mapping"]["dropped_groups"] == {"head": 2, "head_dist": 2, "dist_token": 1}
    assert any("dist_token" in note for note in meta["mapping"]["notes"])


def test_dino_released_backbone(workdir):
    source = workdir / "dino_deitsmall.pth"
    torch.save(vit(), source)
    import_weights(str(source), "--format", "dino")
    meta = check_written(workdir, OUT.format("dino_deitsmall"), encoder_state(), source, "dino")
    assert meta["entry"] is None and meta["mapping"]["dropped"] == 0


def test_dino_full_checkpoint_prefers_the_teacher(workdir):
    head = {"head.mlp.0.weight": torch.randn(64, 32), "head.last_layer.weight_g": torch.ones(100, 1)}
    teacher = {f"backbone.{k}": v for k, v in vit(seed=1).items()} | head
    student = {f"module.backbone.{k}": v for k, v in vit(seed=2).items()} | {f"module.{k}": v for k, v in head.items()}
    source = workdir / "dino_full_checkpoint.pth"
    torch.save({"teacher": teacher, "student": student, "epoch": 100, "dino_loss": {"center": torch.zeros(1, 100)},
                "args": argparse.Namespace(arch="vit_tiny", out_dim=100)}, source)
    import_weights(str(source), "--format", "dino")
    meta = check_written(workdir, OUT.format("dino_full_checkpoint"), encoder_state(seed=1), source, "dino")
    assert meta["entry"] == "teacher" and meta["mapping"]["dropped_groups"] == {"head": 2}
    assert meta["mapping"]["renamed"] == len(encoder_state()) and meta["mapping"]["prefixes_removed"] == {
        "backbone.": len(teacher) - len(head)}
    out = workdir / "student.safetensors"
    import_weights(str(source), "--format", "dino", "--entry", "student", "--out", str(out))
    assert check_written(workdir, out, encoder_state(seed=2), source, "dino")["entry"] == "student"


def test_timm_safetensors_with_head(workdir):
    source = workdir / "vit_tiny_patch4_16.safetensors"
    save_file(vit(num_classes=10), str(source))
    proc = import_weights(str(source), "--format", "timm")
    meta = check_written(workdir, OUT.format("vit_tiny_patch4_16"), encoder_state(num_classes=10), source, "timm")
    assert meta["mapping"]["dropped_groups"] == {"head": 2}
    assert "tensors, 0 renamed, 2 dropped" in proc.stdout


def test_half_precision_weights_are_stored_as_float32(workdir):
    source = workdir / "vit_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in vit().items()}, str(source))
    import_weights(str(source), "--format", "timm")
    expected = {k: v.to(torch.bfloat16).float() for k, v in encoder_state().items()}
    meta = check_written(workdir, OUT.format("vit_bf16"), expected, source, "timm")
    assert meta["mapping"]["source_dtypes"] == ["bfloat16"]


def test_an_imported_teacher_starts_a_dbot_chain(workdir):
    # the tiny student's geometry (8 px grey, 2-px patches), wider and deeper: teacher_swap takes it as stage 0's
    source = workdir / "teacher.safetensors"
    save_file(vit(num_classes=10, img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=3, num_heads=1),
              str(source))
    out = "results/imported/teacher/encoder.safetensors"
    proc = import_weights(str(source), "--format", "timm", "--num-heads", "1", "--expect-params", "geometry")
    assert f"--set dbot.chains.<name>={out}" in proc.stdout
    run_cli(sys.executable, "-m", "pipeline.stages.training.teacher_swap", "--preset", "tiny", "--stage", "ext_stage0",
            "--set", f"dbot.chains.ext={out}")
    made = json.loads((workdir / "results/seed0/teacher_swap/ext_stage0/teacher.json").read_text())
    assert made["source"] == out and made["source_node"] == "import_weights"
    assert made["model"]["embed_dim"] == 64 and made["model"]["num_heads"] == 1


def test_an_evaluation_node_evaluates_an_imported_encoder(workdir):
    """knn and linprobe of the tiny study take weights id imported_<name>: the file import_weights wrote."""
    source = workdir / "released.safetensors"
    save_file(vit(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2), str(source))
    import_weights(str(source), "--format", "timm", "--num-heads", "2")
    run_cli(sys.executable, "-m", "pipeline.stages.training.prepare_data", "--preset", "tiny")
    for node in ("knn", "linprobe"):
        run_cli(sys.executable, "-m", stage_module(node), "--preset", "tiny", "--weights", "imported_released")
        metrics = json.loads((workdir / f"results/seed0/{node}/imported_released/metrics.json").read_text())
        assert 0 <= metrics["metrics"]["top1"] <= 1 and metrics["weights"]["id"] == "imported_released"
    proc = run_cli(sys.executable, "-m", "pipeline.stages.evaluation.knn", "--preset", "tiny",
                   "--weights", "imported_nope", check=False)
    assert proc.returncode == 2 and "no imported encoder results/imported/nope/encoder.safetensors" in proc.stderr


# ---- refused: one line, exit 2, nothing written ----

def test_missing_file(workdir):
    check_refused(import_weights("nowhere.pth", "--format", "mae", check=False), workdir, "missing file", "nowhere.pth")


def test_unknown_format(workdir):
    torch.save({"model": vit()}, workdir / "x.pth")
    check_refused(import_weights("x.pth", "--format", "beit", check=False), workdir, "unknown --format", "beit")


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_needs_code(workdir):
    torch.save({"model": vit(), "hook": RunsCode()}, workdir / "evil.pth")
    check_refused(import_weights("evil.pth", "--format", "mae", check=False), workdir, "evil.pth", "run code")
    assert not (workdir / "pwned").exists()


@pytest.mark.parametrize("fmt, content, words", [
    ("mae", {"model": {"foo.weight": torch.zeros(2)}, "epoch": 3}, ("no ViT encoder", "foo.weight")),
    ("dino", {"epoch": 3, "optimizer": {}}, ("no dino encoder", "teacher / student")),
])
def test_no_recognisable_encoder(workdir, fmt, content, words):
    torch.save(content, workdir / "other.pth")
    check_refused(import_weights("other.pth", "--format", fmt, check=False), workdir, *words)


def test_wrong_shapes(workdir):
    state = vit()
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 32)
    torch.save({"model": state}, workdir / "bad.pth")
    check_refused(import_weights("bad.pth", "--format", "mae", check=False), workdir,
                  "blocks.1.mlp.fc1.weight (100, 32) != (128, 32)")


def test_unknown_extra_keys(workdir):
    torch.save(vit() | {"blocks.0.ls1.gamma": torch.ones(32)}, workdir / "layerscale.pth")
    check_refused(import_weights("layerscale.pth", "--format", "timm", check=False), workdir,
                  "unexpected: blocks.0.ls1.gamma")


def test_global_pool_fc_norm_is_refused_unless_used_as_the_final_norm(workdir):
    state = vit()
    state["fc_norm.weight"], state["fc_norm.bias"] = state.pop("norm.weight"), state.pop("norm.bias")
    save_file(state, str(workdir / "gap.safetensors"))
    check_refused(import_weights("gap.safetensors", "--format", "timm", check=False), workdir, "--fc-norm-as-norm")
    import_weights("gap.safetensors", "--format", "timm", "--fc-norm-as-norm")
    meta = check_written(workdir, OUT.format("gap"), encoder_state(), workdir / "gap.safetensors", "timm")
    assert meta["mapping"]["renamed"] == 2 and any("fc_norm" in note for note in meta["mapping"]["notes"])


def test_params_mismatch_with_expect_params(workdir):
    torch.save({"model": vit()}, workdir / "mae.pth")
    check_refused(import_weights("mae.pth", "--format", "mae", "--expect-params", check=False), workdir,
                  "data.img_size 8 (file: 16)", "model.patch_size 2 (file: 4)", "data.channels 1 (file: 3)")


def test_an_existing_out_is_kept_unless_forced(workdir):
    torch.save({"model": vit()}, workdir / "mae.pth")
    out = workdir / "results/imported/mae/encoder.safetensors"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"earlier")
    proc = import_weights("mae.pth", "--format", "mae", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "exists; pass --force" in proc.stderr and out.read_bytes() == b"earlier"
    import_weights("mae.pth", "--format", "mae", "--force")
    check_written(workdir, out, encoder_state(), workdir / "mae.pth", "mae")
