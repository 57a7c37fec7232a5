"""An encoder's file without torch or timm: its checks, its state-dict layout, and a numpy copy of it.

An encoder file is a plain timm VisionTransformer state dict in safetensors (pipeline.models.encoder.Encoder.vit),
beside its sidecar JSON (pipeline.checkpoint: the sha256, and the model config under "model"); an external file
(a bare timm ViT state dict) has no sidecar, and its config is read from its shapes (infer_model).
pipeline.models.encoder.load_encoder builds a torch Encoder from such a file. `load` here checks the same things, with
the same one-line errors, and gives the weights as float32 numpy arrays (what the Encoder's parameters would
hold) with the config; `save` writes them as save_encoder does (same keys, bytes and sidecar fields). A node
that only copies weights (teacher_swap) starts in a fraction of a second instead of importing torch and timm.

The layout of the plain timm ViTs (pipeline.config.PLAIN_VITS: every preset's arch) is written out here
(plain_vit_state, checked against timm in tests/test_startup.py); for any other arch `load` builds the Encoder to
learn it.
"""
from __future__ import annotations

from pipeline.checkpoint import load_arrays, save_arrays
from pipeline.config import PLAIN_VITS
from pipeline.errors import PipelineError

# timm archs whose state dict (for the sizes pipeline.models.encoder.Encoder gives them) is plain_vit_state's: class
# token, learned positions, conv patch embedding, pre-norm blocks with qkv bias and a 4x MLP, final norm.
_SIZES = ("patch_size", "embed_dim", "depth", "num_heads", "img_size", "in_chans")


def check_input(path, config: dict, in_chans: int, img_size: int) -> None:
    """A ViT (config: its in_chans, img_size) takes exactly the images it was made for: a PipelineError,
    before any work, for data of another channel count or size (timm would fail mid-run)."""
    if (config["in_chans"], config["img_size"]) != (in_chans, img_size):
        raise PipelineError(f"{path} takes {config['in_chans']}-channel {config['img_size']}px images, but the data "
                            f"has {in_chans}-channel {img_size}px images (data.channels, data.img_size)")


def infer_model(tensors: dict, study: dict, img_size: int, in_chans: int) -> dict:
    """The encoder config of a bare timm ViT state dict (tensors or arrays), from its shapes: width, depth, patch
    size, image size and channels. Heads cannot be read from shapes: the study's own count (`study`: its encoder
    config, params model) at the study's width, else timm's convention of 64-wide heads (ViT-Ti/S/B/L). Unknown
    layouts fall back to the study's encoder for `img_size` pixels and `in_chans` channels."""
    model = dict(study, img_size=img_size, in_chans=in_chans)
    try:
        proj = tensors["patch_embed.proj.weight"]                     # (D, C, p, p)
        width, patch = proj.shape[0], proj.shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks."))
        grid = int(round((tensors["pos_embed"].shape[1] - 1) ** 0.5))
    except (KeyError, ValueError, IndexError):
        return model
    heads = model["num_heads"] if width == model["embed_dim"] else max(1, width // 64)
    return dict(model, embed_dim=width, depth=depth, num_heads=heads, patch_size=patch, img_size=grid * patch,
                in_chans=proj.shape[1])


def state_mismatch(expected: dict, got: dict) -> str:
    """What keeps the state dict `got` from loading where `expected` is wanted (values: tensors, arrays or
    shapes): missing and unexpected keys, shapes that differ; "" when it fits."""
    shape = lambda v: tuple(getattr(v, "shape", v))
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {shape(got[k])} != {shape(v)}" for k, v in expected.items()
              if k in got and shape(got[k]) != shape(v)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            parts.append(f"{label}: {', '.join(items[:3])}" + (f" (+{len(items) - 3} more)" if len(items) > 3 else ""))
    return "; ".join(parts)


def plain_vit_state(model: dict) -> dict[str, tuple] | None:
    """{key: shape} of the state dict of the Encoder that `model` (a sidecar's config) describes, in timm's
    order, when its arch is one of PLAIN_VITS and its sizes are ones the Encoder is built with; else None (an
    arch written out nowhere here, or a config the Encoder may refuse: building it tells)."""
    if model.get("arch") not in PLAIN_VITS or not all(type(model.get(k)) is int for k in _SIZES):
        return None
    d, depth, heads, p, img, c = (model[k] for k in ("embed_dim", "depth", "num_heads", "patch_size", "img_size",
                                                      "in_chans"))
    if min(d, heads, p, c) < 1 or depth < 0 or img < p or d % heads or d % 4:
        return None
    state = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + (img // p) ** 2, d),
             "patch_embed.proj.weight": (d, c, p, p), "patch_embed.proj.bias": (d,)}
    block = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
             "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
             "mlp.fc1.weight": (4 * d, d), "mlp.fc1.bias": (4 * d,), "mlp.fc2.weight": (d, 4 * d), "mlp.fc2.bias": (d,)}
    for i in range(depth):
        state.update({f"blocks.{i}.{k}": shape for k, shape in block.items()})
    return state | {"norm.weight": (d,), "norm.bias": (d,)}


def load(path, study: dict, in_chans: int, img_size: int) -> tuple[dict, dict, dict]:
    """(arrays, config, sidecar) of the encoder file `path` for images of `in_chans` channels and `img_size` pixels:
    verified and checked as pipeline.models.encoder.load_encoder does (`study`: the study's encoder config, for a
    file without its own), the arrays float32 as the Encoder's parameters would hold them. A problem is the same
    one-line PipelineError."""
    import numpy as np

    arrays, meta = load_arrays(path)
    model = meta.get("model") or infer_model(arrays, study, img_size, in_chans)
    expected = plain_vit_state(model)
    if expected is None:                  # another arch: the Encoder itself says what it holds (torch, timm)
        from pipeline.models.encoder import encoder_for

        expected = encoder_for(path, model).vit.state_dict()
    problems = state_mismatch(expected, arrays)
    if problems:
        raise PipelineError(f"{path} does not fit the encoder architecture: {problems}")
    config = dict(model)                  # pipeline.models.encoder.Encoder.config of this model
    check_input(path, config, in_chans, img_size)
    as_parameter = lambda a: a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a
    return {k: as_parameter(arrays[k]) for k in expected}, config, meta


def truncated(arrays: dict, config: dict, depth: int) -> tuple[dict, dict]:
    """The arrays and config of pipeline.models.encoder.Encoder.truncated(depth): the first `depth` blocks, then the
    final norm."""
    if not 0 <= depth <= config["depth"]:
        raise ValueError(f"cannot keep {depth} of {config['depth']} blocks")
    kept = {k: v for k, v in arrays.items() if not (k.startswith("blocks.") and int(k.split(".")[1]) >= depth)}
    return kept, dict(config, depth=depth)


def save(path, arrays: dict, config: dict, meta: dict) -> dict:
    """pipeline.models.encoder.save_encoder for arrays: the state dict as safetensors, the model config in the
    sidecar."""
    return save_arrays(path, arrays, dict(meta, model=config))
