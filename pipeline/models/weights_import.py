"""Released ViT checkpoints (MAE, DeiT, DINO, timm) as this repository's encoder state dict: reading, format
layouts, key mapping and shape checks, for python -m pipeline.stages.training.import_weights.

The encoder (pipeline.models.encoder.Encoder.vit) is a plain timm VisionTransformer, so every supported release already
uses its key names; importing is finding the encoder's dict in the file, taking wrappers' prefixes off, dropping
what is not the encoder (decoders, heads), and checking every shape against the plain ViT its shapes describe
(pipeline.models.encoder_file.plain_vit_state).

Reading: a .safetensors file, or a torch file loaded with torch.load(weights_only=True): tensors, plain
containers and numbers only; a pickle that needs any other global (code) is refused with a one-line error. The
one class allowed besides is argparse.Namespace, a plain attribute holder that MAE's and DINO's full training
checkpoints keep their `args` in (unpickling it sets attributes, runs no code).

Layouts (FORMATS), the entry chosen first when several are there (--entry names another):
- mae:  {"model": {...}} (mae_pretrain_vit_*.pth; a full training checkpoint also has the decoder, "optimizer",
        "args": the decoder_* keys and mask_token are dropped) or a plain dict.
- deit: {"model": {...}} with head.* (dropped); a distilled DeiT's head_dist.* is dropped too, its dist_token
        (and its row of pos_embed) has no place in this encoder (one class token): refused, unless
        --drop-dist-token drops it (noted in the provenance: the features then differ from the distilled model's).
- dino: the released backbone (a plain dict, no head), or a full training checkpoint {"teacher": {...},
        "student": {...}}: the teacher by default (DINO's evaluated model), "backbone." and DDP's "module."
        prefixes taken off, the projection head (head.*) dropped.
- timm: a plain dict (pytorch_model.bin, model.safetensors) or a timm training checkpoint (state_dict_ema,
        model_ema, state_dict, model: timm's load_state_dict order); "module." / "_orig_mod." prefixes off
        (timm's clean_state_dict), head.* and pre_logits.* dropped (timm's checkpoint_filter_fn). A
        global-average-pool model's fc_norm.* (the norm after pooling; such a model has no norm.*) is refused
        unless --fc-norm-as-norm uses it as the final norm (applied to every token: not the same features).
Every floating tensor is stored as float32 (what the Encoder's parameters hold).

The head count cannot be read from shapes: --num-heads, else timm's ViT-Ti/S/B/L/H count for the width (192: 3,
384: 6, 768: 12, 1024: 16, 1280: 16), else params model.num_heads when the width is params model.embed_dim.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.models.encoder_file import PLAIN_VITS, plain_vit_state, state_mismatch

FORMATS = ("mae", "timm", "deit", "dino")
ENTRIES = {                                  # where each format keeps the encoder's dict, first found first
    "mae": ("model",),
    "deit": ("model",),
    "dino": ("teacher", "student"),
    "timm": ("state_dict_ema", "model_ema", "state_dict", "model"),
}
PREFIXES = {"mae": ("module.",), "deit": ("module.",), "dino": ("module.", "backbone."),
            "timm": ("module.", "_orig_mod.")}
DROPS = {                                    # (group, pattern) of keys that are not the encoder, per format
    "mae": (("decoder", r"^(decoder_.*|mask_token)$"), ("head", r"^head\.")),
    "deit": (("head", r"^head\."), ("head_dist", r"^head_dist\.")),
    "dino": (("head", r"^head\."),),
    "timm": (("head", r"^head\."), ("pre_logits", r"^pre_logits\.")),
}
STANDARD = {192: ("tiny", 3), 384: ("small", 6), 768: ("base", 12), 1024: ("large", 16), 1280: ("huge", 16)}


def one_line(text) -> str:
    return " ".join(str(text).split())


def read_checkpoint(path: Path):
    """The object in `path`: a .safetensors file's tensors, else torch.load(weights_only=True) of it."""
    import argparse

    import torch

    if not path.is_file():
        raise PipelineError(f"missing file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise PipelineError(f"{path} is not a readable safetensors file ({one_line(e)})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        needs = re.search(r"GLOBAL ([\w.]+)", text)
        if needs or (isinstance(e, pickle.UnpicklingError) and "Weights only" in text):
            what = f"it needs {needs[1]}" if needs else "it holds objects other than tensors"
            raise PipelineError(f"{path} refused: unpickling it would run code ({what}); only tensors and plain "
                                "containers are loaded (torch.load weights_only=True): save its state dict alone "
                                "(or as safetensors) and import that") from None
        raise PipelineError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {one_line(e)[:200]})") \
            from None


def _is_state(obj) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def find_state(obj, fmt: str, path, entry: str | None = None) -> tuple[dict, str]:
    """(the encoder's state dict, the entry it was found under, "" for the file's top level) of a checkpoint of
    format `fmt`; a PipelineError when there is none."""
    if not isinstance(obj, dict):
        raise PipelineError(f"{path} holds a {type(obj).__name__}, not a dict of tensors: no {fmt} encoder in it")
    if entry is not None:
        if not _is_state(obj.get(entry)):
            raise PipelineError(f"{path} has no dict of tensors under --entry {entry!r} (its entries: "
                                f"{_listing(obj)})")
        return dict(obj[entry]), entry
    for key in ENTRIES[fmt]:
        if _is_state(obj.get(key)):
            return dict(obj[key]), key
    if _is_state(obj):
        return dict(obj), ""
    raise PipelineError(f"{path}: no {fmt} encoder in it: a {fmt} checkpoint is a dict of tensors or keeps one "
                        f"under {' / '.join(ENTRIES[fmt])} (its entries: {_listing(obj)})")


def _listing(obj: dict, n: int = 6) -> str:
    keys = [str(k) for k in obj]
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "") if keys else "none"


def map_state(state: dict, fmt: str, path, drop_dist_token: bool = False,
              fc_norm_as_norm: bool = False) -> tuple[dict, dict]:
    """(the encoder's tensors under this repository's names, float32; the mapping record for the provenance:
    counts of kept / renamed / dropped keys, the dropped groups, the prefixes removed, notes)."""
    import torch

    prefixes, dropped, notes = {}, {}, []
    out, origin = {}, {}                     # origin: the file's key of each name in out
    for key, value in state.items():
        name = key
        stripped = True
        while stripped:                      # wrappers in any order (timm's clean_state_dict)
            stripped = False
            for prefix in PREFIXES[fmt]:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
                    prefixes[prefix] = prefixes.get(prefix, 0) + 1
        group = next((g for g, pattern in DROPS[fmt] if re.match(pattern, name)), None)
        if group is not None:
            dropped[group] = dropped.get(group, 0) + 1
            continue
        if name in out:
            raise PipelineError(f"{path}: two keys map to {name} once prefixes are removed ({key})")
        out[name], origin[name] = value, key
    if "dist_token" in out:
        if not drop_dist_token:
            raise PipelineError(f"{path} is a distilled model (dist_token, {tuple(out['dist_token'].shape)}): this "
                                "encoder has one class token and no place for the distillation token; pass "
                                "--drop-dist-token to drop it and its pos_embed row (the features then differ from "
                                "the distilled model's)")
        del out["dist_token"]
        dropped["dist_token"] = 1
        pos = out.get("pos_embed")
        if pos is not None and pos.ndim == 3 and pos.shape[1] >= 2:
            out["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
            notes.append("dist_token dropped with its pos_embed row (index 1): the encoder attends to the class "
                         "token and patches only, so its features differ from the distilled model's")
    if any(k.startswith("fc_norm.") for k in out):
        fc = [k for k in out if k.startswith("fc_norm.")]
        if any(k.startswith("norm.") for k in out):
            for k in fc:
                del out[k]
            dropped["fc_norm"] = len(fc)
        elif not fc_norm_as_norm:
            raise PipelineError(f"{path} is a global-average-pool model ({', '.join(fc)}, no norm.*): its norm comes "
                                "after pooling, this encoder's final norm is on every token; pass --fc-norm-as-norm "
                                "to use it as the final norm (the features then differ)")
        else:
            for k in fc:
                name = "norm." + k.removeprefix("fc_norm.")
                out[name], origin[name] = out.pop(k), origin.pop(k)
            notes.append("fc_norm (norm after average pooling) used as norm (the final norm of every token)")
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in out.values()})
    tensors = {k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in out.items()}
    renamed = sum(name != origin[name] for name in out)      # a key renamed twice (prefix, fc_norm) counts once
    record = {"kept": len(tensors), "renamed": renamed, "dropped": sum(dropped.values()),
              "dropped_groups": dropped, "prefixes_removed": prefixes, "source_dtypes": dtypes, "notes": notes}
    return tensors, record


def infer_config(tensors: dict, path, study: dict, num_heads: int | None = None) -> tuple[dict, str]:
    """(the encoder config the shapes describe: arch, patch_size, embed_dim, depth, num_heads, img_size, in_chans;
    where its head count came from), every key and shape checked against the plain ViT of that config
    (check_shapes): a one-line PipelineError otherwise. `study`: the study's encoder config (params model), whose
    arch names a family that is not a plain ViT and whose head count a file of its width takes."""
    proj, pos = tensors.get("patch_embed.proj.weight"), tensors.get("pos_embed")
    if proj is None or pos is None or "cls_token" not in tensors:
        missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in tensors]
        raise PipelineError(f"{path}: no ViT encoder in it (no {', '.join(missing)}; its keys: {_listing(tensors)})")
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise PipelineError(f"{path}: patch_embed.proj.weight {tuple(proj.shape)} is not a square-patch conv "
                            "(embed_dim, channels, patch, patch)")
    width, patch = proj.shape[0], proj.shape[-1]
    grid = round((pos.shape[1] - 1) ** 0.5) if pos.ndim == 3 and pos.shape[1] > 1 else 0
    if pos.ndim != 3 or grid * grid != pos.shape[1] - 1:
        raise PipelineError(f"{path}: pos_embed {tuple(pos.shape)} is not a class token plus a square grid of "
                            "patch positions (1, 1 + n*n, embed_dim)")
    blocks = {int(m[1]) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))}
    config = {"arch": None, "patch_size": patch, "embed_dim": width, "depth": 1 + max(blocks) if blocks else 0,
              "num_heads": None, "img_size": grid * patch, "in_chans": proj.shape[1]}
    arch = f"vit_{STANDARD[width][0]}_patch{patch}_224" if width in STANDARD else None
    config["arch"] = arch if arch in PLAIN_VITS else study["arch"]   # the family: sizes are passed
    check_shapes(tensors, config, path)        # shapes first: they do not depend on the head count
    if num_heads is not None:
        heads, source = num_heads, "--num-heads"
    elif width in STANDARD:
        heads, source = STANDARD[width][1], f"timm's ViT-{STANDARD[width][0]} for width {width}"
    elif width == study["embed_dim"]:
        heads, source = study["num_heads"], "params model.num_heads (same width)"
    else:
        raise PipelineError(f"{path}: the head count of a {width}-wide ViT cannot be read from its shapes; "
                            "pass --num-heads")
    if heads < 1 or width % heads:
        raise PipelineError(f"{path}: {heads} heads do not divide the width {width} (--num-heads)")
    return dict(config, num_heads=heads), source


def check_shapes(tensors: dict, config: dict, path) -> None:
    """Every key and shape against the plain ViT of `config` (its num_heads may be None: shapes do not depend on
    it): a one-line PipelineError naming the misfits."""
    sized = dict(config, num_heads=config["num_heads"] or 1)
    expected = plain_vit_state(sized)
    if expected is None:                     # an arch not written out in encoder_file: timm tells
        from pipeline.models.encoder import encoder_for

        expected = encoder_for(path, sized).vit.state_dict()
    problems = state_mismatch(expected, tensors)
    if problems:
        raise PipelineError(f"{path} does not fit a plain ViT ({describe(config)}): {problems}")


def describe(config: dict) -> str:
    heads = f", {config['num_heads']} heads" if config.get("num_heads") else ""
    return (f"width {config['embed_dim']}, depth {config['depth']}{heads}, {config['patch_size']}px patches, "
            f"{config['img_size']}px {config['in_chans']}-channel images")


def params_mismatch(config: dict, study: dict, img_size: int, channels: int, what: str) -> list[str]:
    """How `config` differs from the study's encoder (`study`: params model) for its images (data.img_size,
    data.channels): what = "geometry" (what a dBOT stage-0 teacher must share with the student: image size, patch
    size, channels) or "model" (also width, depth, heads)."""
    m = study
    want = {"img_size": ("data.img_size", img_size), "patch_size": ("model.patch_size", m["patch_size"]),
            "in_chans": ("data.channels", channels)}
    if what == "model":
        want |= {k: (f"model.{k}", m[k]) for k in ("embed_dim", "depth", "num_heads")}
    return [f"{name} {value} (file: {config[k]})" for k, (name, value) in want.items() if config[k] != value]
