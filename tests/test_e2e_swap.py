"""A dBOT chain started from an external checkpoint: a timm ViT state dict in safetensors, wider and deeper
than the student, given by path in params dbot.chains (the teacher-swap study's fourth teacher)."""
import json
import sys

import pytest
import timm
import torch
from conftest import run_cli
from safetensors.torch import save_file

from pipeline.dag import stage_module

pytestmark = pytest.mark.e2e


def stage(name, *args, check=True):
    return run_cli(sys.executable, "-m", stage_module(name), "--preset", "tiny", *args, check=check)


def test_chain_from_a_wider_deeper_external_timm_checkpoint(workdir):
    # the tiny preset's student: 8 px digits, 2-px patches, width 32, depth 2; the teacher: width 64, depth 3
    teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=8, in_chans=1,
                                patch_size=2, embed_dim=64, depth=3, num_heads=1)
    save_file(teacher.state_dict(), str(workdir / "external_vit.safetensors"))
    chain = ["--set", f"dbot.chains.external={workdir / 'external_vit.safetensors'}"]
    stage("prepare_data")
    for k in range(3):
        stage("teacher_swap", "--stage", f"external_stage{k}", *chain)
        stage("pretrain_dbot", "--stage", f"external_stage{k}", *chain)
    stage("knn", "--weights", "dbot_external_stage2", *chain)

    made = json.loads((workdir / "results/seed0/teacher_swap/external_stage0/teacher.json").read_text())
    assert made["source_node"] == "external" and (made["model"]["embed_dim"], made["model"]["depth"]) == (64, 3)
    student = json.loads((workdir / "results/seed0/pretrain_dbot/external_stage0/encoder.json").read_text())
    assert (student["model"]["embed_dim"], student["model"]["depth"]) == (32, 2)    # the student keeps its size
    next_teacher = json.loads((workdir / "results/seed0/teacher_swap/external_stage1/teacher.json").read_text())
    assert next_teacher["source"] == "results/seed0/pretrain_dbot/external_stage0/encoder.safetensors"
    flops = [json.loads((workdir / f"results/seed0/pretrain_dbot/external_stage{k}/metrics.json").read_text())
             ["final"]["flops_per_image"] for k in (0, 1)]
    assert flops[0] > flops[1]                  # stage 0 pays for the larger teacher's forward, stage 1 does not
    knn = json.loads((workdir / "results/seed0/knn/dbot_external_stage2/metrics.json").read_text())
    assert knn["weights"]["method"] == "dbot" and 0 <= knn["metrics"]["top1"] <= 1


def test_an_external_teacher_that_is_a_pickle_is_refused_before_anything_is_written(workdir):
    torch.save({"cls_token": torch.zeros(1, 1, 32)}, workdir / "pickled.safetensors")
    stage("prepare_data")
    proc = stage("teacher_swap", "--stage", "external_stage0", "--set",
                 f"dbot.chains.external={workdir / 'pickled.safetensors'}", check=False)
    assert proc.returncode == 2
    assert (proc.stderr.strip().splitlines()[-1].startswith("error: ")
            and "not a readable safetensors file" in proc.stderr)
    assert not (workdir / "results/seed0/teacher_swap").exists()
