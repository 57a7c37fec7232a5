"""The method registry: METHODS, name -> build(params, in_chans, seed, teacher) returning an nn.Module with

- forward(imgs, generator, step) -> (loss, outputs dict holding at least "mask");
- `.encoder`, the student encoder;
- optional hooks the engine calls: start_schedule(steps_per_epoch, total_steps), after_step(step).

`NEEDS_LABELS` trains with labels (supervised: the reference and a teacher for the swap study; it runs
as the `supervised` node). `NEEDS_TEACHER` methods get a FrozenTeacher built from a checkpoint by the pretrain stage (dBOT).
`EMA_METHODS` carry their own EMA teacher (pipeline.models.ema.EMAMethod) and write the encoder chosen by
their `evaluate_weights` param (student or teacher).
"""
import importlib

NAMES = ("mae", "dbot", "sdae", "rcmae", "bootmae", "supervised")   # pipeline.methods.<name>, METHODS' order
NEEDS_LABELS = {"supervised"}
NEEDS_TEACHER = {"dbot"}
EMA_METHODS = {"sdae", "rcmae", "bootmae"}


def __getattr__(name: str):
    """METHODS (name -> build), made on first use: the methods' modules import torch and timm, which a node
    that only checks its arguments (pretrain's check reads NAMES) does not need."""
    if name != "METHODS":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    methods = {n: importlib.import_module(f"pipeline.methods.{n}").build for n in NAMES}
    globals()["METHODS"] = methods
    return methods
