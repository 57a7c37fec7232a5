"""Params: params/base.yaml + params/presets/<preset>.yaml (+ key=value overrides), strictly validated.

The resolved params are plain data (yaml.safe_load; never evaluated). Validation has two layers, both run
before any work: the JSON schema (params/schema.yaml + each method's section from its module: types, ranges, unknown
keys) and the cross-field checks below (sizes that must divide, paths that must exist).
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import jsonschema
import yaml

from pipeline import methods
from pipeline.errors import PipelineError

PARAMS_DIR = Path("params")
BASE = PARAMS_DIR / "base.yaml"
SCHEMA = PARAMS_DIR / "schema.yaml"
# The plain timm ViTs, whose names model.arch may take without importing timm (seconds), and whose weights layout
# pipeline.models.encoder_file writes out.
PLAIN_VITS = frozenset({
    "vit_tiny_patch16_224", "vit_tiny_patch16_384",
    "vit_small_patch8_224", "vit_small_patch16_224", "vit_small_patch16_384", "vit_small_patch32_224",
    "vit_small_patch32_384",
    "vit_base_patch8_224", "vit_base_patch16_224", "vit_base_patch16_384", "vit_base_patch32_224",
    "vit_base_patch32_384",
    "vit_large_patch14_224", "vit_large_patch16_224", "vit_large_patch16_384", "vit_large_patch32_224",
    "vit_large_patch32_384",
    "vit_huge_patch14_224",
})


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"missing params file: {path}") from None
    except yaml.YAMLError as e:
        raise PipelineError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PipelineError(f"{path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def merge(base: dict, override: dict) -> dict:
    """Deep merge: mappings merge key by key, any other value replaces; null over a mapping removes it (a preset's
    `dbot: {stages: {stage2: null}}` leaves base.yaml's third stage out)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif value is None and isinstance(out.get(key), dict):
            del out[key]
        else:
            out[key] = copy.deepcopy(value)
    return out


def presets() -> list[str]:
    return sorted(p.stem for p in (PARAMS_DIR / "presets").glob("*.yaml"))


def parse_override(item: str) -> dict:
    """'pretrain.epochs=3' -> {'pretrain': {'epochs': 3}} (the value is parsed as YAML data)."""
    if "=" not in item:
        raise PipelineError(f"override {item!r} must look like section.key=value")
    dotted, raw = item.split("=", 1)
    value = yaml.safe_load(raw)
    for key in reversed(dotted.split(".")):
        value = {key: value}
    return value


def load(preset: str = "default", overrides: list[str] = (), files: list[Path] = (), base: Path = BASE,
         check_paths: bool = True) -> dict:
    """Resolve base <- preset <- files <- overrides and validate; PipelineError (one line) on any problem.

    check_paths=False skips the check that data.path exists: planning a DAG (the Snakefile, dvc.yaml's
    generator) needs the params only; every stage CLI checks it."""
    params = _read_yaml(base)
    preset_file = PARAMS_DIR / "presets" / f"{preset}.yaml"
    if not preset_file.is_file():
        raise PipelineError(f"unknown preset {preset!r}; known presets: {', '.join(presets())}")
    params = merge(params, _read_yaml(preset_file))
    for path in files:
        params = merge(params, _read_yaml(Path(path)))
    for item in overrides:
        params = merge(params, parse_override(item))
    source = " + ".join([str(base), f"preset {preset}"] + [str(f) for f in files] + list(overrides))
    if "seed" in params:
        raise PipelineError(f"invalid params ({source}): seed is not a params key; the study's seeds are `seeds: [..]` "
                            "and each node gets its own with --seed")
    for section, values in params.items():
        if isinstance(values, dict) and "bf16" in values:
            raise PipelineError(f"invalid params ({source}): {section}.bf16 is now {section}.precision: auto | fp32 | "
                                "bf16 | fp16 (bf16: true -> bf16, false -> fp32; auto chooses per machine)")
    validate(params, source=source, check_paths=check_paths)
    return with_seed(params, params["seeds"][0])


# Seeds. Study seed S owns the block 1000 S .. 1000 S + 999; each stochastic node seeds its generators with its
# own seed b = 1000 S + offset and the few after it: b (encoder init; the engine's per-step draws
# b * 1_000_003 + step and epoch order b * 7_919 + epoch + 1, with b = 999 for node seed 0: engine.stream_key),
# b + 1 (decoder or head), b + 2 (a second network:
# SdAE's random teacher); robustness b + 10 i + severity. Offsets 10 apart keep every node's seeds apart
# (tests/test_seeds.py lists them all). Shared on purpose: random_init and dBOT stage 0 (the stage-0 teacher is a
# copy of the student's own init, dbot main_pretrain.py:220), the chains of one dBOT stage (they differ only in
# their teacher), and a protocol's seed across the encoders it evaluates (every encoder gets the same probe).
SEED_BLOCK = 1000
DBOT_STAGE_SEEDS = 10                 # dBOT stage k: 1000 S + 10 k (k < 50, below the methods' offsets)
SEED_OFFSETS = {"random_init": 0, **{m: methods.spec(m)["seed_offset"] for m in methods.NAMES   # 500, 510, ..., 540
                                     if methods.spec(m)["seed_offset"] is not None},
                "linprobe": 900, "segprobe": 910, "finetune": 920, "pictures": 930, "robustness": 950}
MAX_DBOT_STAGES = min(v for v in SEED_OFFSETS.values() if v) // DBOT_STAGE_SEEDS


def node_seed(params: dict, node: str, stage: int = 0) -> int:
    """The seed of a stochastic node of study seed params["seed"]: `node` is a method (its training node; "dbot"
    with its `stage`), "random_init", a protocol (linprobe, segprobe, finetune, robustness) or "pictures" (the
    masks of every training node's reconstruction picture). See SEED_OFFSETS above."""
    base = SEED_BLOCK * params["seed"]
    if node == "dbot":
        return base + DBOT_STAGE_SEEDS * stage
    return base + SEED_OFFSETS[node]


def method_params(params: dict, method: str, stage: int = 0) -> dict:
    """params as the training node of `method` (dBOT: its `stage`) sees them: pretrain = the study's pretrain
    section with the node's own keys over it (methods.own_pretrain), so one preset holds each method's own schedule
    (params/presets/imagenet.yaml). Unchanged where the node sets none. A params_reads.Recorder stays one."""
    own = methods.own_pretrain(params, method, stage)
    if not own:
        return params
    merged = merge(params["pretrain"], own)
    if hasattr(params, "with_section"):                  # recording the node's reads (params_reads.Recorder)
        return params.with_section("pretrain", merged)
    return {**params, "pretrain": merged}


def with_seed(params: dict, seed: int) -> dict:
    """params for one node of the study: params["seed"] = seed, which must be one of params seeds."""
    if seed not in params["seeds"]:
        raise PipelineError(f"seed {seed} is not one of this study's seeds {params['seeds']}")
    return dict(params, seed=seed)


def _momentum_problems(method: str, spec: dict):
    """tau_epochs [start, end] for every schedule but piecewise, which needs one more than its breakpoints."""
    taus, points = spec["tau_epochs"], spec.get("breakpoints")
    if spec["schedule"] != "piecewise":
        if len(taus) != 2:
            yield (f"{method}.momentum: schedule {spec['schedule']} takes tau_epochs [start, end], "
                   f"got {len(taus)} values")
    elif points is None or len(taus) != len(points) + 1:
        yield (f"{method}.momentum: schedule piecewise needs one more tau_epochs than breakpoints, got {len(taus)} "
               f"and {0 if points is None else len(points)}")
    elif any(b <= a for a, b in zip(points, points[1:])):
        yield f"{method}.momentum.breakpoints must increase, got {points}"


def schema() -> dict:
    """params/schema.yaml with every method's section (its module's SPEC["params"], pipeline.methods.schema).
    A single-stage method's section may also hold `pretrain`: any of the pretrain keys, its own schedule
    (method_params); a dBOT stage takes any pretrain key besides its required epochs and blr."""
    out = _read_yaml(SCHEMA)
    out["required"] = out["required"] + list(methods.NAMES)
    out["properties"].update({name: methods.schema(name) for name in methods.NAMES})
    keys = out["properties"]["pretrain"]["properties"]
    for name in methods.with_node("pretrain"):
        section = out["properties"][name]
        section["properties"] = {**section["properties"], "pretrain": {  # a copy: not the cached SPEC's own dict
            "type": "object", "additionalProperties": False, "properties": keys}}
    out["$defs"]["stage"]["properties"] = {**keys, **out["$defs"]["stage"]["properties"]}
    return out


def without_method_sections(params: dict) -> dict:
    """The params that params/schema.yaml describes on its own (no method sections, no node seed): what the Snakefile
    validates with snakemake.utils.validate, as workflows do (load() has validated the whole already)."""
    return copy.deepcopy({k: v for k, v in params.items() if k not in methods.NAMES and k != "seed"})


def validate(params: dict, source: str = "params", check_paths: bool = True) -> None:
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema()).iter_errors(params))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "top level"
        raise PipelineError(f"invalid params ({source}): {where}: {error.message}")
    for problem in _cross_field_problems(params, check_paths):
        raise PipelineError(f"invalid params ({source}): {problem}")


def _cross_field_problems(p: dict, check_paths: bool = True):
    d, m, t = p["data"], p["model"], p["pretrain"]
    if d["img_size"] % m["patch_size"]:
        yield f"model.patch_size {m['patch_size']} does not divide data.img_size {d['img_size']}"
    if m["embed_dim"] % m["num_heads"]:
        yield f"model.num_heads {m['num_heads']} does not divide model.embed_dim {m['embed_dim']}"
    if m["decoder_dim"] % m["decoder_heads"]:
        yield f"model.decoder_heads {m['decoder_heads']} does not divide model.decoder_dim {m['decoder_dim']}"
    num_patches = (d["img_size"] // m["patch_size"]) ** 2
    launch = p["launch"]
    for where, own in _schedules(p):            # pretrain.*, and each training node's own keys over it
        s = merge(t, own)
        if int(num_patches * (1 - s["mask_ratio"])) < 1:
            yield f"{where}.mask_ratio {s['mask_ratio']} leaves no visible patch of {num_patches}"
        if s["crop_scale"][0] > s["crop_scale"][1]:
            yield f"{where}.crop_scale {s['crop_scale']} must be [low, high] with low <= high"
        if launch["tasks"] > 1 and s["batch_size"] % launch["tasks"]:
            yield f"{where}.batch_size {s['batch_size']} does not divide by launch.tasks {launch['tasks']}"
    if d["dataset"] in ("imagefolder", "cifar"):
        if not d["path"]:
            yield f"data.path is required for dataset {d['dataset']}"
        elif check_paths and not Path(d["path"]).is_dir():
            yield f"data.path {d['path']} does not exist or is not a folder"
    if d["format"] == "stream" and d["dataset"] != "imagefolder":
        yield f"data.format stream needs data.dataset imagefolder ({d['dataset']} is always prepared as a tensor)"
    for method in methods.NAMES:                 # a method's params bounded by the study (its SPEC's at_most)
        ratio = merge(t, methods.own_pretrain(p, method) if method != "dbot" else {})["mask_ratio"]
        masked = num_patches - int(num_patches * (1 - ratio))
        bounds = {"masked_patches": (masked, f"the {masked} masked patches"),
                  "model.depth": (m["depth"], f"model.depth {m['depth']}")}
        for key, bound in methods.spec(method)["at_most"].items():
            limit, text = bounds[bound]
            if p[method][key] is not None and p[method][key] > limit:
                yield f"{method}.{key} {p[method][key]} exceeds {text}"
    for method in sorted(methods.EMA_METHODS):
        if p[method]["momentum"]["update"] == "epoch" and p[method]["momentum"]["schedule"] == "repo":
            yield f"{method}.momentum: schedule repo indexes steps within the epoch; it needs update: step"
        yield from _momentum_problems(method, p[method]["momentum"])
    if launch["tasks"] > 1 and launch["executor"] == "inline":
        yield f"launch.tasks {launch['tasks']} needs executor local or slurm (one process per task)"
    gpus, nodes = launch["slurm"]["gpus_per_node"], launch["slurm"]["nodes"]
    if nodes > 1 and launch["executor"] != "slurm":
        yield f"launch.slurm.nodes {nodes} needs executor slurm (executor {launch['executor']} runs on this machine)"
    if launch["tasks"] % nodes:
        yield f"launch.tasks {launch['tasks']} does not divide over launch.slurm.nodes {nodes} (the same per node)"
    if launch["executor"] == "slurm" and gpus and launch["tasks"] != gpus * nodes:
        yield (f"launch.tasks {launch['tasks']} must equal launch.slurm.gpus_per_node {gpus} x nodes {nodes} "
               "(one process per GPU)")
    stages = list(p["dbot"]["stages"])
    if stages != [f"stage{k}" for k in range(len(stages))]:
        yield f"dbot.stages must be stage0, stage1, ... in order, got {', '.join(stages)}"
    if len(stages) > MAX_DBOT_STAGES:
        yield f"dbot.stages: at most {MAX_DBOT_STAGES} stages (their seeds 1000 S + 10 k stay below the methods')"
    depth0 = p["dbot"]["stage0_teacher_depth"]
    if depth0 is not None and depth0 > m["depth"]:
        yield f"dbot.stage0_teacher_depth {depth0} exceeds model.depth {m['depth']} (the random teacher's blocks)"
    from pipeline.layout import TEACHER_SOURCES

    for chain, source in p["dbot"]["chains"].items():
        if source not in TEACHER_SOURCES and not Path(source).is_file():
            yield (f"dbot.chains.{chain}: {source!r} is neither a weights id of this study "
                   f"({', '.join(TEACHER_SOURCES)}) nor an existing file")
    if m["arch"] not in PLAIN_VITS:
        import timm  # late: only for another arch, and slow to import

        if not timm.is_model(m["arch"]):
            yield f"model.arch {m['arch']!r} is not a timm model name"
    from pipeline import layout

    kept = {name: layout.kept_epochs(p, name) for name in methods.with_node("pretrain")}
    first = next(iter(kept))
    for name, epochs in kept.items():           # one DAG rule / foreach stage declares every method's kept files
        if epochs != kept[first]:
            yield (f"{name}.pretrain: the single-stage methods keep their encoder after the same epochs (one rule "
                   f"declares them): {name} {_short(epochs)}, {first} {_short(kept[first])}; set "
                   "pretrain.keep_every_epochs null (or in each method's pretrain) when their epochs differ")


def _schedules(p: dict):
    """(where, own keys) of every pretraining schedule of the study: pretrain itself, each single-stage method's
    <method>.pretrain and each dBOT stage, the keys a node sets over pretrain (own_pretrain)."""
    yield "pretrain", {}
    for name in methods.with_node("pretrain"):
        if methods.own_pretrain(p, name):
            yield f"{name}.pretrain", methods.own_pretrain(p, name)
    for stage in p["dbot"]["stages"]:
        yield f"dbot.stages.{stage}", p["dbot"]["stages"][stage]


def _short(epochs: list[int]) -> str:
    return "none" if not epochs else f"[{', '.join(map(str, epochs[:3]))}{', ...' if len(epochs) > 3 else ''}]"


def section_hash(params: dict, sections: list[str]) -> str:
    """A short stable hash of the named top-level sections (what a node's result depends on)."""
    blob = json.dumps({s: params[s] for s in sections}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tracking_uri(params: dict) -> str:
    import os

    return params["tracking"]["uri"] or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
