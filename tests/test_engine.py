"""The training engine: schedule, weight-decay groups, resume bit-identical, non-finite loss handling."""
import pytest
import torch
from test_dbot_options import first_step_moments
from torch import nn

from pipeline.errors import PipelineError
from pipeline.train import engine


class Tiny(nn.Module):
    """forward(imgs, generator) -> (loss, outputs), as every method."""

    def __init__(self, scale=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 4)
        self.scale = scale

    def forward(self, x, gen, step=0):
        noise = torch.rand(x.shape[0], 4, generator=gen)
        return ((self.lin(x.flatten(1)) - noise) ** 2).mean() * self.scale, {}


def cfg(**kw):
    base = dict(epochs=3, batch_size=8, lr=1e-2, min_lr=1e-4, warmup_epochs=1, weight_decay=0.05, clip_grad=1.0,
                precision="fp32", crop_scale=(0.5, 1.0), hflip=True, checkpoint_every_min=0.0, seed=1,
                config_hash="h", desc="test")
    return engine.TrainConfig(**dict(base, **kw))


IMAGES = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_lr_schedule_warmup_then_cosine():
    lrs = engine.lr_schedule(cfg(epochs=10, warmup_epochs=2), steps_per_epoch=5)
    assert len(lrs) == 50 and lrs[0] == 0
    assert lrs[10] == pytest.approx(1e-2) and 1e-4 <= lrs[-1] < 2e-4
    assert (lrs[:10].diff() > 0).all() and (lrs[10:].diff() <= 0).all()


def test_no_weight_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = engine.param_groups(model, 0.05)
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0


def test_no_weight_decay_on_tokens_and_positions():
    """Tokens (cls, mask tokens) and learnable positions are not decayed (as timm's no_weight_decay and BootMAE's
    optimiser); frozen parameters are in no group."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token, self.mask_token = nn.Parameter(torch.zeros(1, 1, 4)), nn.Parameter(torch.zeros(1, 1, 4))
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
            self.frozen_pos_embed = nn.Parameter(torch.zeros(1, 5, 4), requires_grad=False)
            self.proj = nn.Linear(4, 4)

    model = Tokens()
    decay, no_decay = engine.param_groups(model, 0.05)
    assert decay["params"] == [model.proj.weight]
    assert {id(p) for p in no_decay["params"]} == {id(model.cls_token), id(model.mask_token), id(model.pos_embed),
                                                    id(model.proj.bias)}


def test_history_and_images_seen(tmp_path):
    seen = []
    result = engine.train(Tiny(), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(),
                          engine.Run(tmp_path / "s.pt", on_epoch=seen.append))
    assert [h["epoch"] for h in result.history] == [0, 1, 2] == [m["epoch"] for m in seen]
    assert result.images_seen == 3 * 40 and result.history[-1]["loss"] < result.history[0]["loss"]


class Crash(Exception):
    pass


def crash_at_step(model, step: int, images, conf, state_path) -> None:
    """Train `model` until its forward is called for step `step` (0-based), which raises Crash."""
    calls, original = {"n": 0}, model.forward

    def dies(x, gen, step_now):
        calls["n"] += 1
        if calls["n"] == step + 1:
            raise Crash
        return original(x, gen, step_now)

    model.forward = dies
    with pytest.raises(Crash):
        engine.train(model, engine.TrainData(images, [0.5], [0.25]), conf, engine.Run(state_path))


def record_steps(model) -> list[int]:
    """The global step of every forward call `model` gets from here on (the engine passes it as third argument)."""
    steps, original = [], model.forward

    def recorded(x, gen, step, *args, **kw):
        steps.append(step)
        return original(x, gen, step, *args, **kw)

    model.forward = recorded
    return steps


def test_no_tensor_is_read_back_per_step(tmp_path, monkeypatch):
    """The loop reads no tensor value (item, tolist, cpu: a host-device sync on a GPU) inside a step: the epoch
    loss is summed on the device and read once per epoch."""
    reads = []
    for name in ("item", "tolist", "cpu"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda t, *a, _f=original, _n=name, **k: reads.append(_n) or _f(t, *a, **k))
    engine.train(Tiny(), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(epochs=2, checkpoint_every_min=1e9),
                 engine.Run(tmp_path / "s.pt"))
    assert reads == ["tolist"] + ["item", "cpu"] * 2    # the schedule once; per epoch (5 steps): its loss, the save


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resume_from_any_step_is_bit_identical(tmp_path, capsys, precision):
    """In every precision; fp16's GradScaler (its scale and growth count) is part of the saved state. The rerun
    starts at the saved step and runs only the remaining steps (a restart from scratch would also end
    bit-identical: training is deterministic)."""
    conf = cfg(precision=precision)
    ref = Tiny()
    engine.train(ref, engine.TrainData(IMAGES, [0.5], [0.25]), conf, engine.Run(tmp_path / "ref.pt"))
    crash_at_step(Tiny(), 7, IMAGES, conf, tmp_path / "run.pt")
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    assert saved["step"] == 7
    assert (saved["scaler"]["scale"] > 0) if precision == "fp16" else saved["scaler"] == {}
    resumed = Tiny()
    steps = record_steps(resumed)
    capsys.readouterr()
    result = engine.train(resumed, engine.TrainData(IMAGES, [0.5], [0.25]), conf, engine.Run(tmp_path / "run.pt"))
    assert f"resuming {tmp_path / 'run.pt'} at step 7" in capsys.readouterr().err
    assert steps == list(range(7, 15))                         # 3 epochs of 5 steps: only steps 7..14 ran
    assert torch.equal(resumed.lin.weight, ref.lin.weight) and len(result.history) == 3
    assert result.images_seen == 3 * 40 and [h["epoch"] for h in result.history] == [0, 1, 2]


COMPILED_CALLS = []     # one entry per call of a graph compiled by the "counted_aot_eager" backend


def counted_aot_eager(graph, example_inputs):
    """torch.compile backend: aot_eager's compiled graph, each call of it counted in COMPILED_CALLS."""
    compiled = torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    def run(*args):
        COMPILED_CALLS.append(len(args))
        return compiled(*args)

    return run


torch._dynamo.register_backend(counted_aot_eager, name="counted_aot_eager")


def test_a_resumed_run_keeps_the_attention_kernels_it_measured(tmp_path, monkeypatch):
    """Kernels chosen by measurement (hardware.attention_kernel, ViT-B-size calls) are part of the resumable state:
    the resumed process runs them instead of measuring anew, which could pick the other kernel (other rounding)."""
    from pipeline import hardware

    chosen = {"cpu|torch.bfloat16|8|16|197|197|32|True": "fused"}
    monkeypatch.setattr(hardware, "_CHOSEN", dict(chosen))
    crash_at_step(Tiny(), 7, IMAGES, cfg(), tmp_path / "run.pt")
    assert torch.load(tmp_path / "run.pt", weights_only=True)["attention"] == chosen
    hardware._CHOSEN.clear()                      # a new process: nothing measured yet
    engine.train(Tiny(), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(), engine.Run(tmp_path / "run.pt"))
    assert hardware.attention_choices() == chosen


def test_compiled_training_matches_eager(tmp_path):
    """TrainConfig.compile (params launch.compile) runs the forward through torch.compile: the compiled graph runs
    at every step (counted by the backend); aot_eager generates no code, so the same steps give the same weights
    within float tolerance, and the saved keys stay the model's."""
    eager, compiled = Tiny(), Tiny()
    engine.train(eager, engine.TrainData(IMAGES, [0.5], [0.25]), cfg(epochs=1), engine.Run(tmp_path / "eager.pt"))
    COMPILED_CALLS.clear()
    engine.train(compiled, engine.TrainData(IMAGES, [0.5], [0.25]), cfg(epochs=1, compile="counted_aot_eager"),
                 engine.Run(tmp_path / "compiled.pt"))
    assert len(COMPILED_CALLS) == 5                          # 40 images / batch 8: every step ran the graph
    assert torch.allclose(compiled.lin.weight, eager.lin.weight, atol=1e-6)
    assert set(torch.load(tmp_path / "compiled.pt", weights_only=True)["model"]) == {"lin.weight", "lin.bias"}


def test_state_with_other_params_is_not_resumed(tmp_path, capsys):
    engine.train(Tiny(), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(epochs=1), engine.Run(tmp_path / "s.pt"))
    engine.train(Tiny(), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(epochs=1, config_hash="other"),
                 engine.Run(tmp_path / "s.pt"))
    assert "not resuming" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_last_good_state(tmp_path):
    engine.train(Tiny(), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(epochs=1), engine.Run(tmp_path / "s.pt"))
    good = torch.load(tmp_path / "s.pt", weights_only=True)
    with pytest.raises(PipelineError, match="non-finite loss"):
        engine.train(Tiny(scale=float("nan")), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(epochs=2),
                     engine.Run(tmp_path / "s.pt"))
    kept = torch.load(tmp_path / "s.pt", weights_only=True)
    assert kept["step"] == good["step"] and torch.isfinite(kept["loss_sum"])


DIGITS = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def dbot(params):
    from pipeline.methods import METHODS
    from pipeline.models.encoder import build_encoder
    from pipeline.models.teacher import FrozenTeacher

    return METHODS["dbot"](params, 1, 0, FrozenTeacher(build_encoder(params["model"], 8, 1, seed=0)))


def test_resume_with_drop_path_is_bit_identical(tmp_path):
    """dBOT drops paths in encoder and decoder (0.2): the draws come from the step's generator, so a run resumed
    after a crash replays them and ends bit-identical; another seed's run drops other paths."""
    from pipeline import config
    from pipeline.models.encoder import DropPath

    params = config.load("tiny", ["model.decoder_depth=2", "dbot.drop_path=0.2", "dbot.decoder_drop_path=0.2"])
    conf = cfg(batch_size=8, seed=4, checkpoint_every_min=0.0)
    ref = dbot(params)
    assert len([m for m in ref.encoder.modules() if isinstance(m, DropPath)]) == 2          # block 1 of 2
    assert len([m for m in ref.decoder.modules() if isinstance(m, DropPath)]) == 2
    engine.train(ref, engine.TrainData(DIGITS, [0.5], [0.25]), conf, engine.Run(tmp_path / "ref.pt"))
    crash_at_step(dbot(params), 6, DIGITS, conf, tmp_path / "run.pt")
    resumed = dbot(params)
    steps = record_steps(resumed)
    engine.train(resumed, engine.TrainData(DIGITS, [0.5], [0.25]), conf, engine.Run(tmp_path / "run.pt"))
    assert steps == list(range(6, 12))                         # 3 epochs of 4 steps: resumed at the saved step 6
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), ref.state_dict().values()))
    no_drop = dbot(config.load("tiny", ["model.decoder_depth=2", "dbot.drop_path=0.0", "dbot.decoder_drop_path=0.0"]))
    engine.train(no_drop, engine.TrainData(DIGITS, [0.5], [0.25]), conf, engine.Run(tmp_path / "no_drop.pt"))
    assert not torch.equal(no_drop.encoder.vit.blocks[1].mlp.fc1.weight, ref.encoder.vit.blocks[1].mlp.fc1.weight)


def test_initial_optimizer_state_starts_a_fresh_run_only(tmp_path, monkeypatch):
    """dBOT's carry_optimizer_state: a fresh run starts from another run's moments (same names and shapes; the
    rest at zero), a resumed one from its own; TrainResult.optimizer is the run's final state by name."""
    first = engine.train(Tiny(), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(epochs=1), engine.Run(tmp_path / "a.pt"))
    carried = first.optimizer
    assert set(carried) == {"lin.weight", "lin.bias"} and carried["lin.weight"]["exp_avg"].abs().sum() > 0
    assert first_step_moments(monkeypatch, lambda: engine.train(
        Tiny(), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(epochs=1), engine.Run(tmp_path / "b.pt"))) == {}  # zeros
    moments = first_step_moments(monkeypatch, lambda: engine.train(
        Tiny(), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(epochs=1),
        engine.Run(tmp_path / "c.pt", initial_optimizer_state=carried)))
    assert torch.equal(moments["lin.weight"], carried["lin.weight"]["exp_avg"])
    wider = {"lin.weight": dict(carried["lin.weight"], exp_avg=torch.ones(8, 16), exp_avg_sq=torch.ones(8, 16)),
             "lin.bias": carried["lin.bias"]}
    moments = first_step_moments(monkeypatch, lambda: engine.train(
        Tiny(), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(epochs=1),
        engine.Run(tmp_path / "d.pt", initial_optimizer_state=wider)))
    assert set(moments) == {"lin.bias"}                     # a head of another width starts fresh
    model, calls = Tiny(), {"n": 0}                         # a resumed run keeps its own state
    original = model.forward

    def dies_at_step_7(x, gen, step):
        calls["n"] += 1
        if calls["n"] == 8:
            raise Crash
        return original(x, gen, step)

    model.forward = dies_at_step_7
    with pytest.raises(Crash):
        engine.train(model, engine.TrainData(IMAGES, [0.5], [0.25]), cfg(), engine.Run(tmp_path / "e.pt"))
    saved = torch.load(tmp_path / "e.pt", weights_only=True)["optimizer"]["state"][0]["exp_avg"]
    moments = first_step_moments(monkeypatch, lambda: engine.train(
        Tiny(), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(),
        engine.Run(tmp_path / "e.pt", initial_optimizer_state=carried)))
    assert torch.equal(moments["lin.weight"], saved)


@pytest.mark.parametrize("method", ["dbot", "rcmae"])
def test_teacher_methods_compile(tmp_path, method):
    """Frozen (dBOT) and EMA (RC-MAE) teachers run under inference_mode, which torch.compile cannot trace:
    teacher.no_graph switches to no_grad while compiling, so launch.compile works for them too."""
    from pipeline import config
    from pipeline.methods import METHODS
    from pipeline.models.encoder import build_encoder
    from pipeline.models.teacher import FrozenTeacher

    params = config.load("tiny")
    teacher = FrozenTeacher(build_encoder(params["model"], 8, 1, seed=0)) if method == "dbot" else None
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    COMPILED_CALLS.clear()
    result = engine.train(METHODS[method](params, 1, 0, teacher), engine.TrainData(images, [0.5], [0.25]),
                          cfg(epochs=1, batch_size=16, compile="counted_aot_eager"), engine.Run(tmp_path / "s.pt"))
    assert len(COMPILED_CALLS) >= 2                          # 2 steps through compiled graphs (a graph break: more)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
