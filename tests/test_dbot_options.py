"""dBOT's options from the official code, through the nodes on the tiny preset:

- dbot.carry_optimizer_state: stage k writes optimizer.pt (its final AdamW state, plain tensors) and stage k+1
  starts from it (dbot main_pretrain.py keeps one AdamW across stages); off, a stage starts from zeros;
- dbot.stage0_teacher_depth: teacher_swap cuts the random stage-0 teacher to its first k blocks (0: the patch
  embedding, the official ViT-L/H teacher) and the stage trains on its targets.
The DAG edge of carry_optimizer_state (both DAGs) is tested in tests/test_dag.py.
"""
import torch
from safetensors.torch import load_file

from pipeline import layout
from pipeline.checkpoint import read_json
from pipeline.stages.training import prepare_data, pretrain, random_init, teacher_swap
from pipeline.train import engine

CARRY = ["--set", "dbot.carry_optimizer_state=true"]


def node(main, *argv):
    main(["--preset", "tiny", *argv])


def dbot(*argv):
    pretrain.main(["--preset", "tiny", *argv], method="dbot")


def first_step_moments(monkeypatch, run) -> dict:
    """exp_avg by parameter name that the optimiser holds when the first training step begins."""
    seen, step = {}, engine.train_step

    def recording(model, opt, *args, **kw):
        if not seen:
            names = {id(p): n for n, p in model.named_parameters()}
            seen.update({names[id(p)]: s["exp_avg"].clone() for p, s in opt.state.items()} or {"": None})
        return step(model, opt, *args, **kw)

    monkeypatch.setattr(engine, "train_step", recording)
    run()
    monkeypatch.setattr(engine, "train_step", step)
    return {k: v for k, v in seen.items() if k}


def test_stage_k_plus_1_starts_from_stage_ks_optimizer_state_only_when_carried(workdir, monkeypatch):
    node(prepare_data.main)
    node(random_init.main)
    node(teacher_swap.main, "--stage", "random_stage0")
    dbot("--stage", "random_stage0", *CARRY)
    path = layout.optimizer_path("random_stage0", 0)
    carried = torch.load(path, weights_only=True)               # plain tensors by parameter name
    assert carried["encoder.vit.blocks.0.attn.qkv.weight"]["exp_avg"].abs().sum() > 0
    assert not any(k.startswith("teacher.") for k in carried)   # the frozen teacher has no optimiser state
    node(teacher_swap.main, "--stage", "random_stage1")
    moments = first_step_moments(monkeypatch, lambda: dbot("--stage", "random_stage1", *CARRY))
    assert set(moments) == set(carried)
    assert all(torch.equal(moments[k], carried[k]["exp_avg"]) for k in carried)
    assert layout.optimizer_path("random_stage1", 0).is_file()
    assert first_step_moments(monkeypatch, lambda: dbot("--stage", "random_stage1")) == {}   # off: zeros


def test_stage0_teacher_depth_cuts_the_random_teacher(workdir):
    node(prepare_data.main)
    node(random_init.main)
    node(teacher_swap.main, "--stage", "random_stage0", "--set", "dbot.stage0_teacher_depth=0")
    teacher = layout.teacher_path("random_stage0", 0)
    tensors, meta = load_file(teacher), read_json(layout.sidecar(teacher))
    assert not any(k.startswith("blocks.") for k in tensors) and meta["model"]["depth"] == 0 and meta["depth"] == 0
    floor = load_file(layout.weights_path("random_init", 0))
    assert all(torch.equal(tensors[k], floor[k]) for k in tensors)    # the random init's embedding, unchanged
    dbot("--stage", "random_stage0", "--set", "dbot.stage0_teacher_depth=0")
    metrics = read_json(layout.pretrain_dir("dbot", 0, "random_stage0") / "metrics.json")
    assert metrics["final"]["loss"] > 0
    node(teacher_swap.main, "--stage", "random_stage0", "--set", "dbot.stage0_teacher_depth=1")
    assert {k.split(".")[1] for k in load_file(teacher) if k.startswith("blocks.")} == {"0"}
