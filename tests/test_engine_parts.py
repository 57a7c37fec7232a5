"""The training engine's parts by their contracts: the per-step generator is seeded by the documented
stream_key(seed) * 1_000_003 + step (distinct per seed and per step); make_batch crops and flips (cfg.hflip)
unless the batch comes `cropped`; train moves the model and its running loss sum to the run's device, resolves its
precision and wraps it for that device, compiles it with cfg.compile's backend, calls start_schedule, names the
processes in an indivisible batch error, and notes (on stderr) only the parameters a carried optimizer state has no
moments for; saved_extra returns the saved `extra` only for a matching config_hash, and the state holds the keys the
engine documents. The train tests stop at distributed.wrap or at the first forward: no step runs."""

import pytest
import torch
from test_engine import IMAGES, Tiny, cfg

from pipeline import hardware, ranks
from pipeline.data.datasets import normalize
from pipeline.data.steps import STREAM_OF_SEED_0, augment
from pipeline.errors import PipelineError
from pipeline.train import distributed, engine


def draws(gen: torch.Generator) -> torch.Tensor:
    return torch.rand(8, generator=gen)


def test_step_generator_is_seeded_by_seed_and_step():
    """stream_key(seed) * 1_000_003 + step (pipeline.data.steps), seed 0 drawing as STREAM_OF_SEED_0; every
    (seed, step) pair its own stream."""
    seen = {}
    for seed in (0, 1, 2, 7, 12345):
        key = seed if seed else STREAM_OF_SEED_0
        for step in (0, 1, 2, 5, 999, 123_456):
            gen = engine.step_generator(seed, step)
            assert gen.initial_seed() == key * 1_000_003 + step
            assert torch.equal(draws(gen), draws(torch.Generator().manual_seed(key * 1_000_003 + step)))
            seen[seed, step] = engine.step_generator(seed, step).initial_seed()
    assert len(set(seen.values())) == len(seen)
    assert not torch.equal(draws(engine.step_generator(1, 3)), draws(engine.step_generator(2, 3)))
    assert not torch.equal(draws(engine.step_generator(1, 3)), draws(engine.step_generator(1, 4)))


BATCH = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


def test_make_batch_augments_unless_cropped():
    """A uint8 tensor batch (cropped not given) is cropped and flipped from the step's generator, then normalised;
    a `cropped` one (a stream's) is only normalised and draws nothing."""
    conf = cfg(crop_scale=(0.3, 0.9), hflip=True)
    out = engine.make_batch(BATCH, MEAN, STD, conf, torch.Generator().manual_seed(5), "cpu")
    expected = normalize(augment(BATCH, torch.Generator().manual_seed(5), (0.3, 0.9), True), MEAN, STD)
    assert torch.equal(out, expected)
    assert not torch.allclose(out, normalize(BATCH, MEAN, STD))
    gen = torch.Generator().manual_seed(5)
    before = gen.get_state()
    out = engine.make_batch(BATCH, MEAN, STD, conf, gen, "cpu", cropped=True)
    assert torch.equal(out, normalize(BATCH, MEAN, STD))
    assert torch.equal(gen.get_state(), before)                 # no draw for a batch already cropped


def test_make_batch_flips_as_cfg_hflip_says():
    """crop_scale (1, 1) crops nothing: what is left is the flip, on with hflip, off without."""
    flipped = engine.make_batch(BATCH, MEAN, STD, cfg(crop_scale=(1.0, 1.0), hflip=True),
                                torch.Generator().manual_seed(5), "cpu")
    expected = normalize(augment(BATCH, torch.Generator().manual_seed(5), (1.0, 1.0), True), MEAN, STD)
    assert torch.equal(flipped, expected)
    plain = engine.make_batch(BATCH, MEAN, STD, cfg(crop_scale=(1.0, 1.0), hflip=False),
                              torch.Generator().manual_seed(5), "cpu")
    assert torch.allclose(plain, normalize(BATCH, MEAN, STD), atol=1e-5)       # the identity crop
    mirrored = [i for i in range(len(BATCH)) if not torch.allclose(flipped[i], plain[i], atol=1e-5)]
    assert mirrored and all(torch.allclose(flipped[i], plain[i].flip(-1), atol=1e-5) for i in mirrored)


class Stop(Exception):
    pass


def setup_only(monkeypatch, model, conf, run) -> dict:
    """Run train's setup for `model` up to distributed.wrap, which raises Stop: what it was called with, the
    devices of the model's parameters there, and the devices hardware.resolve was asked for."""
    seen = {"resolved": []}
    resolve = hardware.resolve

    def resolving(asked, *args, **kw):
        seen["resolved"].append((args + tuple(kw.values()) or ("cpu",))[0])
        return resolve(asked, *args, **kw)

    def wrap(m, device):
        seen.update(device=device, params={p.device.type for p in m.parameters()})
        raise Stop

    monkeypatch.setattr(hardware, "resolve", resolving)
    monkeypatch.setattr(distributed, "wrap", wrap)
    with pytest.raises(Stop):
        engine.train(model, engine.TrainData(IMAGES, [0.5], [0.25]), conf, run)
    return seen


def test_train_moves_the_model_to_the_run_device_and_resolves_precision_there(tmp_path, monkeypatch):
    """The meta device stands in for an accelerator: the model is on it when the forward is wrapped for it, and the
    precision was resolved for it (not for the CPU default)."""
    seen = setup_only(monkeypatch, Tiny(), cfg(precision="auto"), engine.Run(tmp_path / "s.pt", device="meta"))
    assert seen["device"] == "meta" and seen["params"] == {"meta"}
    assert seen["resolved"] == ["meta"]


class Hooked(Tiny):
    """Records the backend train compiles it with (without compiling) and its start_schedule call; its forward
    raises Stop: no step runs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def compile(self, *args, **kw):
        self.calls.append(("compile", args, kw))

    def start_schedule(self, steps_per_epoch, total_steps):
        self.calls.append(("start_schedule", steps_per_epoch, total_steps))

    def forward(self, x, gen, step=0):
        raise Stop


def test_train_compiles_with_the_configured_backend_and_starts_the_schedule(tmp_path, capsys):
    """cfg.compile is the backend of the model's own compile (in place); start_schedule gets (steps per epoch,
    total steps) before the first step: 40 images in batches of 8 for 3 epochs, the 120 images the progress bar
    (stderr) counts to."""
    model = Hooked()
    with pytest.raises(Stop):
        engine.train(model, engine.TrainData(IMAGES, [0.5], [0.25]), cfg(compile="some_backend"),
                     engine.Run(tmp_path / "s.pt"))
    assert model.calls == [("compile", (), {"backend": "some_backend"}), ("start_schedule", 5, 15)]
    bar = capsys.readouterr().err
    assert "test:   0%|" in bar and "| 0.00/120 [" in bar                 # desc, 0 of 120 images
    model = Hooked()
    with pytest.raises(Stop):
        engine.train(model, engine.TrainData(IMAGES, [0.5], [0.25]), cfg(), engine.Run(tmp_path / "t.pt"))
    assert model.calls == [("start_schedule", 5, 15)]          # compile None: eager


def test_indivisible_batch_names_the_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(ranks, "world", lambda: ranks.World(0, 3))
    with pytest.raises(PipelineError, match=r"batch size 8 does not divide by 3 processes \(launch.tasks\)"):
        engine.train(Tiny(), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(), engine.Run(tmp_path / "s.pt"))


def moments(shape) -> dict:
    return {"step": torch.tensor(3.0), "exp_avg": torch.full(shape, 0.1), "exp_avg_sq": torch.full(shape, 0.01)}


def test_carried_optimizer_note_names_only_what_starts_at_zero(tmp_path, monkeypatch, capsys):
    """A carried state that lacks a parameter's moments: a note on stderr names it; one with them all: no note."""
    full = {"lin.weight": moments((4, 16)), "lin.bias": moments((4,))}
    setup_only(monkeypatch, Tiny(), cfg(), engine.Run(tmp_path / "a.pt", initial_optimizer_state=full))
    out = capsys.readouterr()
    assert "note:" not in out.err and "note:" not in out.out
    partial = {"lin.bias": moments((4,))}
    setup_only(monkeypatch, Tiny(), cfg(), engine.Run(tmp_path / "b.pt", initial_optimizer_state=partial))
    out = capsys.readouterr()
    assert ("note: the carried optimizer state has no moments for lin.weight; they start at zero"
            in out.err.splitlines())
    assert "note:" not in out.out
    other = {"head.weight": moments((2, 2))}                   # nothing of this model: both named, in group order
    setup_only(monkeypatch, Tiny(), cfg(), engine.Run(tmp_path / "c.pt", initial_optimizer_state=other))
    assert ("note: the carried optimizer state has no moments for lin.weight, lin.bias; they start at zero"
            in capsys.readouterr().err.splitlines())


def test_saved_extra_only_for_the_same_config_hash(tmp_path):
    """The values a run stored (Run.extra) come back from its state for the hash it was made with, else {}."""
    path = tmp_path / "s.pt"
    assert engine.saved_extra(path, "h") == {}                  # no state yet
    result = engine.train(Tiny(), engine.TrainData(IMAGES, [0.5], [0.25]), cfg(epochs=1),
                          engine.Run(path, extra={"run_id": "abc"}))
    assert result.extra == {"run_id": "abc"}
    assert set(torch.load(path, weights_only=True)) == {
        "step", "loss_sum", "history", "images_seen", "wall_s", "config_hash", "extra", "model", "optimizer",
        "scaler", "attention"}
    assert engine.saved_extra(path, "h") == {"run_id": "abc"}
    assert engine.saved_extra(path, "other") == {}
