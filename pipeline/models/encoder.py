"""The ViT encoder shared by every method: an adapter over `timm.create_model`.

- Student mode: `forward(x, ids_keep)` embeds all patches, keeps only the visible ones (+cls) and runs
  the blocks on them (MAE's asymmetric encoder).
- Teacher / evaluation mode: `forward(x)` runs on the full image.
- `return_blocks` also returns chosen block outputs (before the final norm), e.g. dBOT's target layer.
Positions are MAE's fixed 2-D sin-cos embedding (frozen); weights use MAE's initialisation (init="mae"), or
timm's own with learnable positions (init="timm": SdAE's random teacher).
`drop_path` is stochastic depth in training, the rate rising linearly from 0 to it over the blocks (timm's rule,
as dbot models_mae.py:50 and sdae models_mae.py:39). Its draws come from the training step's generator (`step_draws`,
entered by the engine), made for the global batch and cut to this process's rows (pipeline.train.distributed), so a
resumed or data-parallel run drops the same paths as one uninterrupted process; in eval mode (teachers, probes,
pictures) it is the identity. It is not part of the saved config: a loaded encoder has none.
The patch embedding runs as one matmul over the patchified image (the conv's weights, same math):
the strided conv's backward took 17.8 ms a step in bf16 on a 2-core AMX Xeon, the matmul a fraction of it.
pipeline.hardware.attention_kernels picks the attention kernel for the device and precision a loop runs in.
The state dict is the plain timm VisionTransformer's, so any timm ViT state dict loads into it.
"""
from __future__ import annotations

import contextlib
import copy

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models.encoder_file import check_input, infer_model, state_mismatch  # noqa: F401  (check_input: re-exported)
from pipeline.settings import Model


def sincos_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos positions, (1 + grid*grid, dim) with a zero row for cls (MAE's layout)."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                            torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (xs.flatten(), ys.flatten()):  # MAE: first half encodes w, second half h
        out = coord[:, None] * omega[None, :]
        parts += [torch.sin(out), torch.cos(out)]
    pos = torch.cat([parts[0], parts[1], parts[2], parts[3]], dim=1).float()
    return torch.cat([torch.zeros(1, dim), pos]) if cls_token else pos


_STEP_GENERATOR: torch.Generator | None = None      # the training step's generator, while step_draws is active


@contextlib.contextmanager
def step_draws(generator: torch.Generator):
    """Within the block, DropPath draws from `generator` (the engine's step generator) instead of torch's global RNG."""
    global _STEP_GENERATOR
    before, _STEP_GENERATOR = _STEP_GENERATOR, generator
    try:
        yield
    finally:
        _STEP_GENERATOR = before


class DropPath(nn.Module):
    """timm's DropPath (each sample's residual branch is zeroed with probability p, the kept ones scaled by
    1 / (1 - p)), with draws from the step's generator (step_draws) for the whole global batch, this rank's rows."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        scale = _kept_scale(x.shape[0], 1.0 - self.drop_prob).to(device=x.device, dtype=x.dtype, non_blocking=True)
        return x * scale.view(-1, *([1] * (x.ndim - 1)))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


@torch.compiler.disable          # runs eagerly under torch.compile: no guard on the step's generator, no recompiles
def _kept_scale(batch: int, keep: float) -> torch.Tensor:
    """(B,) float32 on the CPU: 1 / keep for the kept samples, 0 for the dropped ones."""
    from pipeline.ranks import rand_rows

    draw = rand_rows(batch, generator=_STEP_GENERATOR)                   # uniform, the global batch's rows
    return (draw < keep).float().div_(keep)


def use_step_drop_path(module: nn.Module) -> nn.Module:
    """Replace every timm DropPath inside `module` (in place) by DropPath of the same rate; returns `module`."""
    from timm.layers import DropPath as TimmDropPath

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TimmDropPath):
                setattr(parent, name, DropPath(child.drop_prob))
    return module


def init_mae_weights(module: nn.Module) -> None:
    """MAE init: xavier-uniform Linear (and patch conv as a Linear), zero bias, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Encoder(nn.Module):
    def __init__(self, model: dict, img_size: int, in_chans: int, depth: int | None = None, drop_path: float = 0.0,
                 init: str = "mae"):
        super().__init__()
        if init not in ("mae", "timm"):
            raise ValueError(f'unknown encoder init {init!r}; known: "mae", "timm"')
        self.config = dict(model, img_size=img_size, in_chans=in_chans,
                           depth=model["depth"] if depth is None else depth)
        self.vit = timm.create_model(
            model["arch"], pretrained=False, num_classes=0, img_size=img_size, in_chans=in_chans,
            patch_size=model["patch_size"], embed_dim=model["embed_dim"],
            depth=self.config["depth"], num_heads=model["num_heads"], drop_path_rate=drop_path)
        use_step_drop_path(self.vit)
        self.grid = img_size // model["patch_size"]
        self.num_patches = self.grid * self.grid
        self.embed_dim = model["embed_dim"]
        if init == "timm":    # timm's init (trunc-normal 0.02 Linear and learnable positions), cls as timm 0.3.2
            nn.init.trunc_normal_(self.vit.cls_token, std=0.02)
            return
        init_mae_weights(self.vit)
        nn.init.normal_(self.vit.cls_token, std=0.02)
        self.vit.pos_embed.data.copy_(sincos_2d(self.embed_dim, self.grid)[None])
        self.vit.pos_embed.requires_grad_(False)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None,
                return_blocks: tuple[int, ...] = ()):
        """x (B, C, H, W); ids_keep (B, K) visible patch indices or None for all.

        Returns tokens (B, 1+K, D) after the final norm, and, if return_blocks is given,
        a dict {block index: (B, 1+K, D) output of that block, before the final norm}.
        """
        h = self.embed(x, ids_keep)
        blocks = {}
        for i, block in enumerate(self.vit.blocks):
            h = block(h)
            if i in return_blocks or i - len(self.vit.blocks) in return_blocks:
                blocks[i] = h
        h = self.vit.norm(h)
        return (h, blocks) if return_blocks else h

    def embed(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens entering the first block (B, 1+K, D): cls, then the (visible) patch embeddings + positions."""
        vit, proj = self.vit, self.vit.patch_embed.proj
        p = proj.kernel_size[0]
        b, c, h, w = x.shape                       # patches flattened (C, p, p), as the conv weight (D, C, p, p)
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        tokens = F.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias) + vit.pos_embed[:, 1:]
        if ids_keep is not None:
            tokens = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def features(self, x: torch.Tensor, kind: str = "cls") -> torch.Tensor:
        """(B, D) image features: the cls token after the final norm, or the mean of patch tokens."""
        h = self(x)
        return h[:, 0] if kind == "cls" else h[:, 1:].mean(dim=1)

    def truncated(self, depth: int) -> Encoder:
        """A copy with only the first `depth` blocks (then the final norm), e.g. BootMAE's probe on an
        intermediate block, or dBOT's depth-0 stage-0 teacher (patch embedding and positions only); the state
        dict is that of a timm ViT of depth `depth`."""
        if not 0 <= depth <= len(self.vit.blocks):
            raise ValueError(f"cannot keep {depth} of {len(self.vit.blocks)} blocks")
        out = copy.deepcopy(self)
        out.vit.blocks = out.vit.blocks[:depth]
        out.config = dict(self.config, depth=depth)
        return out


def build_encoder(model: dict | Model, img_size: int, in_chans: int, seed: int, depth: int | None = None,
                  drop_path: float = 0.0, init: str = "mae") -> Encoder:
    """A freshly initialised encoder of `model` (its config, or the study's sizes: pipeline.settings.Model); the same
    seed gives bit-identical weights (whatever its drop_path)."""
    config = model.config() if isinstance(model, Model) else model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Encoder(config, img_size, in_chans, depth, drop_path, init)


def flops_per_token_block(dim: int, tokens: int) -> float:
    """Forward multiply-adds x2 of one pre-norm ViT block on `tokens` tokens of width `dim`."""
    linear = 2 * tokens * (3 * dim * dim + dim * dim + 8 * dim * dim)
    attention = 2 * 2 * tokens * tokens * dim
    return float(linear + attention)


def encoder_flops(dim: int, depth: int, tokens: int) -> float:
    return depth * flops_per_token_block(dim, tokens)


def save_encoder(path, encoder: Encoder, meta: dict) -> dict:
    """Write the encoder's timm state dict as safetensors, with its model config in the sidecar."""
    from pipeline.checkpoint import save_tensors

    return save_tensors(path, encoder.vit.state_dict(), dict(meta, model=encoder.config))


def encoder_for(path, model: dict) -> Encoder:
    """A fresh Encoder of the config `model` recorded for (or read from) the file `path`; one that cannot be
    built is a one-line PipelineError."""
    try:
        return Encoder(model, model["img_size"], model["in_chans"], model.get("depth"))
    except Exception as e:
        raise PipelineError(f"{path}: cannot build the encoder its metadata describes ({e})") from None


def load_encoder(path, study: dict, in_chans: int, img_size: int) -> tuple[Encoder, dict]:
    """An Encoder holding the weights of `path` (verified) for images of `in_chans` channels and `img_size`
    pixels: the images it will see. A mismatch is a one-line PipelineError.

    The architecture is the one recorded in the file's sidecar, else read from the tensor shapes (an external
    timm ViT state dict; see infer_model, which takes what shapes cannot tell from `study`, the study's encoder
    config: params model). pipeline.models.encoder_file.load makes the same checks without torch.
    """
    from pipeline.checkpoint import load_tensors

    tensors, meta = load_tensors(path)
    model = meta.get("model") or infer_model(tensors, study, img_size, in_chans)
    enc = encoder_for(path, model)
    problems = state_mismatch(enc.vit.state_dict(), tensors)
    if problems:
        raise PipelineError(f"{path} does not fit the encoder architecture: {problems}")
    check_input(path, enc.config, in_chans, img_size)
    enc.vit.load_state_dict(tensors)
    return enc, meta
