"""The training engine: schedule, weight-decay groups, resume bit-identical, non-finite loss handling."""
import math

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


def test_lr_schedule_is_maes_per_step_in_float64():
    """MAE's adjust_learning_rate (util/lr_sched.py) per global step, in Python floats: linear warm-up while
    step < warm, then the half-cosine over the steps after it; the schedule's float64 values within 1e-13."""
    conf = cfg(epochs=7, warmup_epochs=2, lr=3e-3, min_lr=1e-5)
    spe, lrs = 3, engine.lr_schedule(conf, steps_per_epoch=3)
    warm, total = 2 * spe, 7 * spe
    mae = [conf.lr * t / warm if t < warm else
           conf.min_lr + (conf.lr - conf.min_lr) * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))
           for t in range(total)]
    assert lrs.dtype == torch.float64 and lrs.tolist() == pytest.approx(mae, rel=1e-13, abs=0)


def test_adamw_has_maes_betas_and_fused_steps():
    opt = engine.make_optimizer(nn.Linear(2, 2), cfg())
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["fused"] is True


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


def test_epoch_metrics_are_the_mean_step_loss_and_the_epochs_last_lr(tmp_path):
    """An epoch's loss is the mean of its steps' losses, its lr the lr of its last step (lr_schedule), and the run's
    wall time the sum of its epochs' seconds (a fresh run starts at 0)."""
    model, losses = Tiny(), []
    original = model.forward

    def recorded(x, gen, step):
        loss, out = original(x, gen, step)
        losses.append(loss.item())
        return loss, out

    model.forward = recorded
    conf = cfg()
    result = engine.train(model, engine.TrainData(IMAGES, [0.5], [0.25]), conf, engine.Run(tmp_path / "s.pt"))
    lrs = engine.lr_schedule(conf, steps_per_epoch=5).tolist()
    assert [h["loss"] for h in result.history] == pytest.approx([sum(losses[e * 5:e * 5 + 5]) / 5 for e in range(3)],
                                                                rel=1e-6)
    assert [h["lr"] for h in result.history] == [lrs[4], lrs[9], lrs[14]]
    assert result.wall_s == sum(h["seconds"] for h in result.history)


def test_each_step_trains_on_the_images_its_seed_and_step_pick(tmp_path):
    """Step s trains on batch_indices(n, batch, cfg.seed, s): with the identity crop and no flip, the model's input is
    exactly those images, normalised."""
    from pipeline.data.datasets import normalize
    from pipeline.data.steps import batch_indices

    model = Tiny()
    inputs = record_inputs(model)
    conf = cfg(epochs=2, crop_scale=(1.0, 1.0), hflip=False, seed=7)
    engine.train(model, engine.TrainData(IMAGES, [0.5], [0.25]), conf, engine.Run(tmp_path / "s.pt"))
    assert len(inputs) == 10
    for step, x in enumerate(inputs):
        expected = normalize(IMAGES[batch_indices(40, 8, 7, step)], [0.5], [0.25])
        assert torch.allclose(x, expected, atol=1e-4), step


@pytest.mark.parametrize(("step_s", "saved_at"), [(60.0, [2, 4, 5]), (61.0, [1, 2, 3, 4, 5])])
def test_saves_every_checkpoint_every_min_and_at_the_epoch_end(tmp_path, monkeypatch, step_s, saved_at):
    """By the engine's clock (here one that a step advances by step_s): a save once more than
    checkpoint_every_min minutes have passed since the last one, and one at the epoch's end, whose seconds it
    records (5 steps)."""
    from types import SimpleNamespace

    clock = [1000.0]
    monkeypatch.setattr(engine, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    saves, save = [], engine._save
    monkeypatch.setattr(engine, "_save", lambda st, *a: saves.append(st["step"]) or save(st, *a))
    model = Tiny()
    original = model.forward

    def one_step_of_time(x, gen, step):
        clock[0] += step_s
        return original(x, gen, step)

    model.forward = one_step_of_time
    result = engine.train(model, engine.TrainData(IMAGES, [0.5], [0.25]), cfg(epochs=1, checkpoint_every_min=1.0),
                          engine.Run(tmp_path / "s.pt"))
    assert saves == saved_at and result.history[0]["seconds"] == 5 * step_s == result.wall_s
    assert result.history[0]["images_per_s"] == 40 / (5 * step_s)


class Cropped:
    """A stream's interface as the engine reads it (pipeline.data.stream.StreamImages): its shape, and batches that its
    workers have cropped already, here the plain images of batch_indices."""
    shape = IMAGES.shape

    def train_batches(self, indices, batch_size, seed, rows, start, total):
        for step in range(start, total):
            yield IMAGES[indices(len(IMAGES), batch_size, seed, step)[rows]], None


def test_a_streamed_batch_is_not_augmented_again(tmp_path):
    """Batches from a stream arrive cropped: the model sees them only normalised, whatever crop_scale and hflip say."""
    from pipeline.data.datasets import normalize
    from pipeline.data.steps import batch_indices

    model = Tiny()
    inputs = record_inputs(model)
    conf = cfg(epochs=1, crop_scale=(0.3, 0.6), hflip=True)
    engine.train(model, engine.TrainData(Cropped(), [0.5], [0.25]), conf, engine.Run(tmp_path / "s.pt"))
    plain = [normalize(IMAGES[batch_indices(40, 8, 1, step)], [0.5], [0.25]) for step in range(5)]
    assert len(inputs) == 5 and all(torch.equal(x, p) for x, p in zip(inputs, plain))
    inputs.clear()                                               # the same images as a tensor: cropped by the engine
    engine.train(model, engine.TrainData(IMAGES, [0.5], [0.25]), conf, engine.Run(tmp_path / "t.pt"))
    assert len(inputs) == 5 and not any(torch.allclose(x, p, atol=0.1) for x, p in zip(inputs, plain))


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


def record_inputs(model) -> list[torch.Tensor]:
    """The batch every forward call of `model` gets from here on (after the engine's augmentation and normalisation)."""
    inputs, original = [], model.forward
    model.forward = lambda x, gen, step: inputs.append(x) or original(x, gen, step)
    return inputs


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
    err = capsys.readouterr().err
    assert f"resuming {tmp_path / 'run.pt'} at step 7" in err
    assert "120/120 [" in err and "img/s]" in err          # the progress bar went on from step 7's images, in img/s
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
    assert "not resuming" in (err := capsys.readouterr().err) and "(h != other); starting fresh" in err


def test_fp16_resumes_the_saved_gradient_scale(tmp_path):
    """A run whose loss scale had backed off (here 1024, set in the saved state) goes on at that scale, not at a
    fresh GradScaler's 65536 (the scale only grows after 2,000 clean steps)."""
    conf = cfg(precision="fp16")
    crash_at_step(Tiny(), 7, IMAGES, conf, tmp_path / "run.pt")
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    saved["scaler"]["scale"] = 1024.0
    torch.save(saved, tmp_path / "run.pt")
    engine.train(Tiny(), engine.TrainData(IMAGES, [0.5], [0.25]), conf, engine.Run(tmp_path / "run.pt"))
    assert torch.load(tmp_path / "run.pt", weights_only=True)["scaler"]["scale"] == 1024.0


def test_non_finite_loss_stops_and_keeps_last_good_state(tmp_path):
    engine.train(Tiny(), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(epochs=1), engine.Run(tmp_path / "s.pt"))
    good = torch.load(tmp_path / "s.pt", weights_only=True)
    with pytest.raises(PipelineError, match="non-finite loss"):
        engine.train(Tiny(scale=float("nan")), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(epochs=2),
                     engine.Run(tmp_path / "s.pt"))
    kept = torch.load(tmp_path / "s.pt", weights_only=True)
    assert kept["step"] == good["step"] and torch.isfinite(kept["loss_sum"])


def test_weights_made_non_finite_by_a_step_are_never_saved(tmp_path):
    """A step whose loss was finite can still leave non-finite weights (here its after_step hook, at the 7th step):
    no state is saved from then on, the epoch's non-finite loss stops the run, and the state kept on disk is the
    last one with finite weights (saved after 6 steps), which a rerun can resume."""

    class Diverges(Tiny):
        def after_step(self, step):
            if step == 6:
                self.lin.weight.data.fill_(float("inf"))

    with pytest.raises(PipelineError, match="non-finite loss"):
        engine.train(Diverges(), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(), engine.Run(tmp_path / "s.pt"))
    kept = torch.load(tmp_path / "s.pt", weights_only=True)
    assert kept["step"] == 6 and all(torch.isfinite(v).all() for v in kept["model"].values())


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
