"""The method registry: name -> build(params, in_chans, seed, teacher) returning an nn.Module whose
forward(imgs, generator) gives (loss, outputs) and whose `.encoder` is the student encoder.

`needs_teacher` methods get a FrozenTeacher built from a checkpoint by the pretrain stage.
"""
from pipeline.methods import dbot, mae

METHODS = {
    "mae": mae.build,
    "dbot": dbot.build,
}
NEEDS_TEACHER = {"dbot"}
