"""One training step (pipeline/train/engine.py train_step) by what the model gets, and an epoch's throughput.

- a step's batch and every draw of its forward come from the step's generator, step_generator(cfg.seed, step):
  the model sees make_batch(batch, mean, std, cfg, step_generator(cfg.seed, step), device, cropped) and then
  draws the generator's next numbers;
- train_step without `cropped` treats the batch as uncropped (a uint8 tensor's: augmented), and cropped=True
  reaches make_batch (a stream's batch: only normalised);
- a sub-second epoch's images/s is its images over its seconds (the 1e-9 floor only guards a zero)."""
import torch
from test_engine import cfg
from torch import nn

from pipeline import hardware
from pipeline.train import engine

BATCH = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


class Recorder(nn.Module):
    """forward(x, gen, step) -> (loss, {}) as every method; records the batch it got and its first draws."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * 8 * 8, 2)
        self.seen = []

    def forward(self, x, gen, step=0):
        self.seen.append((x.detach().clone(), torch.rand(6, generator=gen), step))
        return self.lin(x.flatten(1)).pow(2).mean(), {}


def one_step(conf, step: int, **kw):
    model = Recorder()
    amp = hardware.resolve("fp32", "cpu")
    opt = engine.make_optimizer(model, conf)
    engine.train_step(model, opt, BATCH, MEAN, STD, conf, 1e-3, step, "cpu", {}, amp, amp.grad_scaler(), **kw)
    assert len(model.seen) == 1
    return model.seen[0]


def expected(conf, step: int, cropped: bool):
    """The batch make_batch gives from the step's generator, and that generator's next draws."""
    gen = engine.step_generator(conf.seed, step)
    x = engine.make_batch(BATCH, MEAN, STD, conf, gen, "cpu", cropped=cropped)
    return x, torch.rand(6, generator=gen)


def test_a_steps_draws_come_from_its_seed_and_step():
    """Seeds 1 and 7 (not 0, whose stream key is shared with no seed): the step's batch and the forward's draws are
    those of step_generator(cfg.seed, step), and another seed gives other ones."""
    for seed, step in ((1, 0), (7, 5)):
        conf = cfg(seed=seed, crop_scale=(0.3, 0.9), hflip=True)
        x, draws, seen_step = one_step(conf, step)
        want_x, want_draws = expected(conf, step, cropped=False)
        assert seen_step == step
        assert torch.equal(x, want_x)
        assert torch.equal(draws, want_draws)
    other_x, other_draws = expected(cfg(seed=2, crop_scale=(0.3, 0.9)), 5, cropped=False)
    assert not torch.equal(draws, other_draws) and not torch.equal(x, other_x)


def test_train_step_without_cropped_augments_the_batch():
    """A uint8 tensor batch (train_step's default): cropped and flipped, the same batch as make_batch(...,
    cropped=False), not the merely normalised one."""
    conf = cfg(seed=1, crop_scale=(0.3, 0.9), hflip=True)
    x, _, _ = one_step(conf, 2)
    assert torch.equal(x, expected(conf, 2, cropped=False)[0])
    assert not torch.allclose(x, engine.make_batch(BATCH, MEAN, STD, conf, None, "cpu", cropped=True))


def test_cropped_true_reaches_make_batch():
    """A stream's batch (cropped=True) is only normalised, and the forward's draws are the generator's first ones:
    nothing was drawn for crops."""
    conf = cfg(seed=1, crop_scale=(0.3, 0.9), hflip=True)
    x, draws, _ = one_step(conf, 2, cropped=True)
    want_x, want_draws = expected(conf, 2, cropped=True)
    assert torch.equal(x, want_x)
    assert torch.equal(draws, want_draws)
    assert torch.equal(draws, torch.rand(6, generator=engine.step_generator(1, 2)))


def test_a_sub_second_epochs_throughput_is_its_images_over_its_seconds():
    """8 images in 0.5 s: 16 images/s; in 0.25 s: 32 (the floor is for a zero-length epoch only)."""
    for seconds, rate in ((0.5, 16.0), (0.25, 32.0)):
        st = {"loss_sum": torch.tensor(2.0), "history": [], "images_seen": 0, "wall_s": 0.0}
        engine._end_epoch(st, epoch=0, spe=2, bs=4, lr=0.1, seconds=seconds, state_path=None, model=None, opt=None,
                          scaler=None, on_epoch=None)
        assert st["history"][0]["images_per_s"] == rate
        assert st["history"][0]["seconds"] == seconds


def test_train_step_sets_every_groups_lr_and_calls_the_models_after_step():
    """The step's lr reaches every parameter group, and a model with an after_step hook (the EMA teacher's
    update) has it called once with the step, after the optimiser has stepped."""
    model, calls = Recorder(), []
    model.after_step = lambda step: calls.append((step, model.lin.weight.detach().clone()))
    conf, amp = cfg(), hardware.resolve("fp32", "cpu")
    opt = engine.make_optimizer(model, conf)
    before = model.lin.weight.detach().clone()
    engine.train_step(model, opt, BATCH, MEAN, STD, conf, 0.0123, 4, "cpu", {}, amp, amp.grad_scaler())
    assert [g["lr"] for g in opt.param_groups] == [0.0123] * len(opt.param_groups)
    assert [step for step, _ in calls] == [4] and not torch.equal(calls[0][1], before)


def test_drop_path_draws_from_the_steps_generator_during_the_forward():
    """Within the forward, DropPath's generator (models.encoder.step_draws) is the step's own generator."""
    from pipeline.models import encoder

    class Seen(Recorder):
        def forward(self, x, gen, step=0):
            self.drop_path_generator, self.step_gen = encoder._STEP_GENERATOR, gen
            return super().forward(x, gen, step)

    model, conf, amp = Seen(), cfg(), hardware.resolve("fp32", "cpu")
    engine.train_step(model, engine.make_optimizer(model, conf), BATCH, MEAN, STD, conf, 1e-3, 2, "cpu", {}, amp,
                      amp.grad_scaler())
    assert model.drop_path_generator is model.step_gen and encoder._STEP_GENERATOR is None


def test_the_step_runs_the_attention_kernel_of_its_precision():
    """Under bf16 on the CPU the step's forward runs attention as explicit matmuls (hardware.rule_kernel: PyTorch's
    CPU flash-attention backward in bf16 is many times slower), and the module's own flag is back after the step."""

    class WithAttention(Recorder):
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.fused_attn = True        # timm's Attention flag; not called here, so no per-call measurement
            self.flags = []

        def forward(self, x, gen, step=0):
            self.flags.append(self.attn.fused_attn)
            return super().forward(x, gen, step)

    for precision, fused in (("bf16", False), ("fp32", True)):
        model, conf, amp = WithAttention(), cfg(), hardware.resolve(precision, "cpu")
        engine.train_step(model, engine.make_optimizer(model, conf), BATCH, MEAN, STD, conf, 1e-3, 0, "cpu", {}, amp,
                          amp.grad_scaler())
        assert model.flags == [fused] and model.attn.fused_attn is True, precision


def test_a_parameter_the_steps_loss_does_not_reach_stays_put():
    """A parameter that had a gradient in step 0 but none in step 1 (its gradient is set to None, not zeroed) is not
    moved by step 1: AdamW skips it, neither its momentum nor its weight decay applies."""

    class SometimesUsed(Recorder):
        def __init__(self):
            super().__init__()
            self.extra = nn.Parameter(torch.ones(4))

        def forward(self, x, gen, step=0):
            loss, out = super().forward(x, gen, step)
            return (loss + self.extra.pow(2).sum() if step == 0 else loss), out

    model, conf, amp = SometimesUsed(), cfg(), hardware.resolve("fp32", "cpu")
    opt = engine.make_optimizer(model, conf)
    engine.train_step(model, opt, BATCH, MEAN, STD, conf, 1e-2, 0, "cpu", {}, amp, amp.grad_scaler())
    after_0, weight_0 = model.extra.detach().clone(), model.lin.weight.detach().clone()
    assert not torch.equal(after_0, torch.ones(4))
    engine.train_step(model, opt, BATCH, MEAN, STD, conf, 1e-2, 1, "cpu", {}, amp, amp.grad_scaler())
    assert model.extra.grad is None and torch.equal(model.extra, after_0)
    assert not torch.equal(model.lin.weight, weight_0)
