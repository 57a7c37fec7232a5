"""Data-parallel test helpers (tests/test_distributed.py, tests/test_slurm.py), and one process of the
2-process equivalence test.

`train_all` trains every method with the engine on the tiny preset, in this process's torch.distributed
world (one process when none is set up), and records the type of the module the engine trained through
(`distributed.wrap`: DistributedDataParallel in a multi-process world). Run as a script, it joins a gloo
group from the env:// variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) and saves its rank's results
to <out>/rank<R>.pt.
"""
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import config
from pipeline.methods import METHODS, NEEDS_LABELS, NEEDS_TEACHER
from pipeline.models.encoder import build_encoder
from pipeline.models.teacher import FrozenTeacher
from pipeline.train import distributed, engine

GLOBAL_BATCH, IMAGES = 16, 64         # 4 steps per epoch, 2 epochs
ATOL, RTOL = 1e-6, 1e-5               # N processes vs one: summation order differs


def without_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    """Drop the key part of attention biases: a key bias does not change the softmax, so its gradient is
    rounding noise, which Adam scales to lr-sized steps that differ between any two summation orders."""
    if name.endswith("qkv.bias"):
        third = t.numel() // 3
        return torch.cat([t[:third], t[2 * third:]])
    return t[t.numel() // 2:] if name.endswith(".kv.bias") else t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_close_states(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        x, y = without_key_bias(k, a[k].float()), without_key_bias(k, b[k].float())
        assert torch.allclose(x, y, atol=ATOL, rtol=RTOL), f"{what}: {k} differs by {(x - y).abs().max():.2e}"


def recording_wrap(seen: list[str]):
    """A stand-in for distributed.wrap that appends the wrapped module's type name to `seen`."""
    wrap = distributed.wrap

    def recorded(model, device):
        wrapped = wrap(model, device)
        seen.append(type(wrapped).__name__)
        return wrapped
    return recorded


def train_all(out_dir: Path, methods=tuple(METHODS), device: str = "cpu", precision: str = "fp32") -> dict:
    params = config.load("tiny")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (IMAGES, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (IMAGES,), generator=g)
    cfg = engine.TrainConfig(epochs=2, batch_size=GLOBAL_BATCH, lr=1e-3, min_lr=1e-5, warmup_epochs=1,
                             weight_decay=0.05, clip_grad=1.0, precision=precision, crop_scale=(0.5, 1.0), hflip=True,
                             checkpoint_every_min=60, seed=3, config_hash="distributed-test")
    results = {}
    for name in methods:
        teacher = FrozenTeacher(build_encoder(params["model"], 8, 1, seed=0)) if name in NEEDS_TEACHER else None
        extra = {"num_classes": 10} if name in NEEDS_LABELS else {}
        model = METHODS[name](params, 1, 0, teacher, **extra)
        wrapped, wrap = [], distributed.wrap
        distributed.wrap = recording_wrap(wrapped)
        try:
            run = engine.train(model, engine.TrainData(images, [0.5], [0.25], labels), cfg,
                               engine.Run(out_dir / name / "state.pt", device=device))
        finally:
            distributed.wrap = wrap
        results[name] = {"loss": torch.tensor([h["loss"] for h in run.history]), "wrapped": wrapped,
                         "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = Path(sys.argv[1])
    torch.save(train_all(out), out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
