"""The method registry: name -> build(params, in_chans, seed, teacher) returning an nn.Module with

- forward(imgs, generator, step) -> (loss, outputs dict holding at least "mask");
- `.encoder`, the student encoder;
- optional hooks the engine calls: start_schedule(steps_per_epoch, total_steps), after_step(step).

`NEEDS_LABELS` trains with labels (supervised: the reference and a teacher for the swap study; it runs
as the `supervised` node). `NEEDS_TEACHER` methods get a FrozenTeacher built from a checkpoint by the pretrain stage (dBOT).
`EMA_METHODS` carry their own EMA teacher (pipeline.ema.EMAMethod) and write the encoder chosen by
their `evaluate_weights` param (student or teacher).
"""
from pipeline.methods import bootmae, dbot, mae, rcmae, sdae, supervised

METHODS = {
    "mae": mae.build,
    "dbot": dbot.build,
    "sdae": sdae.build,
    "rcmae": rcmae.build,
    "bootmae": bootmae.build,
    "supervised": supervised.build,
}
NEEDS_LABELS = {"supervised"}
NEEDS_TEACHER = {"dbot"}
EMA_METHODS = {"sdae", "rcmae", "bootmae"}
