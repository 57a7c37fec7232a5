"""The training engine: schedule, weight-decay groups, resume bit-identical, non-finite loss handling."""
import pytest
import torch
from torch import nn

from pipeline import engine
from pipeline.errors import PipelineError


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


def test_history_and_images_seen(tmp_path):
    seen = []
    result = engine.train(Tiny(), IMAGES, [0.5], [0.25], cfg(), tmp_path / "s.pt", on_epoch=seen.append)
    assert [h["epoch"] for h in result.history] == [0, 1, 2] == [m["epoch"] for m in seen]
    assert result.images_seen == 3 * 40 and result.history[-1]["loss"] < result.history[0]["loss"]


class Crash(Exception):
    pass


def test_no_tensor_is_read_back_per_step(tmp_path, monkeypatch):
    """The loop reads no tensor value (item, tolist, cpu: a host-device sync on a GPU) inside a step: the epoch
    loss is summed on the device and read once per epoch."""
    reads = []
    for name in ("item", "tolist", "cpu"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _f=original, _n=name, **k: reads.append(_n) or _f(t, *a, **k))
    engine.train(Tiny(), IMAGES, [0.5], [0.25], cfg(epochs=2, checkpoint_every_min=1e9), tmp_path / "s.pt")
    assert reads == ["tolist"] + ["item", "cpu"] * 2    # the schedule once; per epoch (5 steps): its loss, the save


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resume_from_any_step_is_bit_identical(tmp_path, precision):
    """In every precision; fp16's GradScaler (its scale and growth count) is part of the saved state."""
    conf = cfg(precision=precision)
    ref = Tiny()
    engine.train(ref, IMAGES, [0.5], [0.25], conf, tmp_path / "ref.pt")
    model, calls = Tiny(), {"n": 0}
    original = model.forward

    def dies_at_step_7(x, gen, step):
        calls["n"] += 1
        if calls["n"] == 8:
            raise Crash
        return original(x, gen, step)

    model.forward = dies_at_step_7
    with pytest.raises(Crash):
        engine.train(model, IMAGES, [0.5], [0.25], conf, tmp_path / "run.pt")
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    assert saved["step"] == 7
    assert (saved["scaler"]["scale"] > 0) if precision == "fp16" else saved["scaler"] == {}
    resumed = Tiny()
    result = engine.train(resumed, IMAGES, [0.5], [0.25], conf, tmp_path / "run.pt")
    assert torch.equal(resumed.lin.weight, ref.lin.weight) and len(result.history) == 3


def test_state_with_other_params_is_not_resumed(tmp_path, capsys):
    engine.train(Tiny(), IMAGES, [0.5], [0.25], cfg(epochs=1), tmp_path / "s.pt")
    engine.train(Tiny(), IMAGES, [0.5], [0.25], cfg(epochs=1, config_hash="other"), tmp_path / "s.pt")
    assert "not resuming" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_last_good_state(tmp_path):
    engine.train(Tiny(), IMAGES, [0.5], [0.25], cfg(epochs=1), tmp_path / "s.pt")
    good = torch.load(tmp_path / "s.pt", weights_only=True)
    with pytest.raises(PipelineError, match="non-finite loss"):
        engine.train(Tiny(scale=float("nan")), IMAGES, [0.5], [0.25], cfg(epochs=2), tmp_path / "s.pt")
    kept = torch.load(tmp_path / "s.pt", weights_only=True)
    assert kept["step"] == good["step"] and torch.isfinite(kept["loss_sum"])
