"""The method registry. A method is one module, pipeline/methods/<name>.py, plus its params section
(params/base.yaml `<name>:`) and its entry in NAMES. The module holds:

- `SPEC`, plain data that everything else reads without importing the module (and so without torch):
  label, color   how plots and tables name and draw it (pipeline.plots);
  node           the training node that runs it: pretrain (one stage, the DAG's `method` wildcard), pretrain_dbot
                 (a chain of stages) or supervised (pipeline.layout);
  teacher        None | "frozen" (a checkpoint, built by the pretrain stage: dBOT) | "ema" (its own mean teacher,
                 pipeline.models.ema.EMAMethod; its section has `momentum` and `evaluate_weights`: which encoder
                 the node writes and the evaluations see);
  labels         trains with labels (supervised);
  seed_offset    its training node's seed offset in the study seed's block (pipeline.config.node_seed);
  at_most        params of its section bounded by a quantity of the study: "masked_patches" or "model.depth";
  params         the JSON schema of each key of its section (all required; params/schema.yaml has the rest);
  optional       (may be absent) the schema of keys its section may leave out: the module says what their absence
                 means (BootMAE's decoder_depth: model.decoder_depth).
- `build(params, in_chans, seed, teacher)`, the method's boundary (it turns its params section into its class's
  explicit arguments; nothing below it reads params: tests/test_layers.py) -> an nn.Module with
  forward(imgs, generator, step) -> (loss, outputs holding at least "mask"), `.encoder` (the student), optional
  hooks start_schedule(steps_per_epoch, total_steps) and after_step(step);
- `forward_flops(params, counts, teacher)` -> (student forward, teacher forward) FLOPs per image
  (pipeline.models.flops: the report's equal-compute axis and the benchmark's MFU).

docs/adding-a-method-or-node.md walks through adding one; tests/test_methods_registry.py adds a toy method to a copy of
the repository and finds it in both DAGs, the schema and the report.
"""
from __future__ import annotations

import ast
import functools
import importlib
from pathlib import Path

NAMES = ("mae", "dbot", "sdae", "rcmae", "bootmae", "supervised")   # the order of tables, plots and the bench
NODES = ("pretrain", "pretrain_dbot", "supervised")
TEACHERS = (None, "frozen", "ema")
BOUNDS = ("masked_patches", "model.depth")


@functools.cache
def spec(name: str) -> dict:
    """The method's SPEC, read from its module's source as a literal (the module itself imports torch)."""
    path = Path(__file__).with_name(f"{name}.py")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["SPEC"]:
            value = ast.literal_eval(node.value)
            break
    else:
        raise ValueError(f"{path} has no SPEC = {{...}} literal")
    if value["node"] not in NODES or value["teacher"] not in TEACHERS or not set(value["at_most"]) <= set(
            value["params"]) or not set(value["at_most"].values()) <= set(BOUNDS):
        raise ValueError(f"{path}: SPEC node must be one of {NODES}, teacher one of {TEACHERS}, at_most maps its "
                         f"own params to one of {BOUNDS}")
    return value


def with_node(node: str) -> tuple[str, ...]:
    """The methods a training node runs, in NAMES order: with_node("pretrain") = the single-stage methods."""
    return tuple(n for n in NAMES if spec(n)["node"] == node)


def with_teacher(kind: str | None) -> set[str]:
    return {n for n in NAMES if spec(n)["teacher"] == kind}


def schema(name: str) -> dict:
    """The JSON schema of params section `name`."""
    props = spec(name)["params"]
    return {"type": "object", "additionalProperties": False, "required": list(props),
            "properties": {**props, **spec(name).get("optional", {})}}


def own_pretrain(params: dict, method: str, stage: int = 0) -> dict:
    """The pretrain.* keys that `method`'s training node sets itself: a single-stage method's `<method>.pretrain`
    (absent = none), dBOT stage k's entry of dbot.stages (its epochs, blr and any other pretrain key)."""
    if method == "dbot":
        return params["dbot"]["stages"][f"stage{stage}"]
    section = params.get(method)
    return (section.get("pretrain") if isinstance(section, dict) else None) or {}


NEEDS_LABELS = {n for n in NAMES if spec(n)["labels"]}
NEEDS_TEACHER = with_teacher("frozen")
EMA_METHODS = with_teacher("ema")


def module(name: str):
    """The method's module (imports torch and timm)."""
    return importlib.import_module(f"pipeline.methods.{name}")


def __getattr__(name: str):
    """METHODS (name -> build), made on first use: the methods' modules import torch and timm, which a node
    that only checks its arguments (pretrain's check reads NAMES) does not need."""
    if name != "METHODS":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    methods = {n: module(n).build for n in NAMES}
    globals()["METHODS"] = methods
    return methods
