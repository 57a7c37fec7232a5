"""pipeline.models.encoder_file's pure parts by their contracts: the config read from a bare timm ViT state dict's
shapes (infer_model), the written-out layout's refusals (plain_vit_state), the kept blocks (truncated), the mismatch
words (state_mismatch) and load's checks and one-line errors on small files. That the numpy load gives what the torch
path gives is tests/test_startup.py's."""
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from pipeline.checkpoint import save_arrays
from pipeline.errors import PipelineError
from pipeline.models import encoder, encoder_file

STUDY = {"arch": "vit_tiny_patch16_224", "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2,
         "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}


def bare_vit(width: int, depth: int = 3, patch: int = 4, grid: int = 3, chans: int = 3) -> dict:
    """The shapes infer_model reads, as tensors: patch embedding (D, C, p, p), positions (1, 1 + grid^2, D), blocks."""
    tensors = {"patch_embed.proj.weight": torch.empty(width, chans, patch, patch),
               "pos_embed": torch.empty(1, 1 + grid ** 2, width), "cls_token": torch.empty(1, 1, width)}
    return tensors | {f"blocks.{i}.norm1.weight": torch.empty(width) for i in range(depth)}


def test_the_sizes_come_from_the_shapes_not_from_the_study():
    got = encoder_file.infer_model(bare_vit(128, depth=3, patch=4, grid=3, chans=3), STUDY, img_size=8, in_chans=1)
    assert got == dict(STUDY, embed_dim=128, depth=3, patch_size=4, img_size=12, in_chans=3, num_heads=2)


@pytest.mark.parametrize("grid", [1, 2, 4])
def test_the_image_size_is_the_position_grid_times_the_patch(grid):
    got = encoder_file.infer_model(bare_vit(64, patch=4, grid=grid), STUDY, img_size=99, in_chans=1)
    assert got["img_size"] == 4 * grid


def test_heads_are_the_studys_at_its_width_else_timms_64_wide_ones():
    at_study_width = encoder_file.infer_model(bare_vit(32), STUDY, img_size=8, in_chans=1)
    assert at_study_width["num_heads"] == 2                  # not max(1, 32 // 64) = 1
    for width, heads in ((128, 2), (192, 3), (768, 12), (48, 1)):
        got = encoder_file.infer_model(bare_vit(width), STUDY, img_size=8, in_chans=1)["num_heads"]
        assert got == heads and type(got) is int


def test_an_unknown_layout_is_the_studys_encoder_for_the_data():
    got = encoder_file.infer_model({"weight": torch.empty(3, 3)}, STUDY, img_size=12, in_chans=3)
    assert got == dict(STUDY, img_size=12, in_chans=3)


def test_a_plain_vit_with_a_size_that_is_not_an_int_has_no_written_out_layout():
    model = dict(STUDY, img_size=8, in_chans=1)
    assert encoder_file.plain_vit_state(model) is not None
    for key in ("embed_dim", "img_size", "in_chans"):
        assert encoder_file.plain_vit_state(dict(model, **{key: float(model[key])})) is None
    assert encoder_file.plain_vit_state(dict(model, arch="vit_base_patch16_clip_224")) is None


def test_sizes_the_encoder_would_refuse_have_no_written_out_layout():
    model = dict(STUDY, img_size=8, in_chans=1)
    assert encoder_file.plain_vit_state(dict(model, embed_dim=36, num_heads=4)) is not None
    for bad in ({"embed_dim": 36, "num_heads": 8},          # heads do not divide the width (36 % 4 == 0)
                {"embed_dim": 30, "num_heads": 2},          # the width is not a multiple of 4 (2 heads divide it)
                {"img_size": 1},                             # an image smaller than one patch
                {"depth": -1}, {"num_heads": 0}, {"in_chans": 0}, {"embed_dim": 0}, {"patch_size": 0}):
        assert encoder_file.plain_vit_state(dict(model, **bad)) is None, bad
    one_patch = encoder_file.plain_vit_state(dict(model, img_size=2))     # an image of exactly one patch
    assert one_patch["pos_embed"] == (1, 2, 32)


def test_truncating_keeps_zero_to_all_blocks_and_names_a_depth_out_of_range():
    config = dict(STUDY, img_size=8, in_chans=1)
    arrays = {k: torch.empty(shape) for k, shape in encoder_file.plain_vit_state(config).items()}
    kept, same = encoder_file.truncated(arrays, config, 2)
    assert kept.keys() == arrays.keys() and same == config
    kept, one = encoder_file.truncated(arrays, config, 1)
    assert one["depth"] == 1 and {k for k in kept if k.startswith("blocks.")} == {
        k for k in arrays if k.startswith("blocks.0.")}
    for depth in (3, -1):
        with pytest.raises(ValueError, match=rf"^cannot keep {depth} of 2 blocks$"):
            encoder_file.truncated(arrays, config, depth)


def test_a_file_of_an_unknown_layout_is_checked_against_the_studys_encoder_for_the_data(tmp_path):
    """A bare file without blocks (no layout to read sizes from) is checked against the study's encoder at the data's
    image size and channels: here its patch embedding and positions fit a 1-channel 8-px study, so only the missing
    blocks and final norm are named, in one line."""
    path = tmp_path / "bare.safetensors"
    save_file({"cls_token": np.zeros((1, 1, 32), np.float32), "pos_embed": np.zeros((1, 17, 32), np.float32),
               "patch_embed.proj.weight": np.zeros((32, 1, 2, 2), np.float32),
               "patch_embed.proj.bias": np.zeros(32, np.float32)}, str(path))
    with pytest.raises(PipelineError) as err:
        encoder_file.load(path, STUDY, in_chans=1, img_size=8)
    assert str(err.value) == (f"{path} does not fit the encoder architecture: missing: blocks.0.norm1.weight, "
                              "blocks.0.norm1.bias, blocks.0.attn.qkv.weight (+23 more)")


def plain_file(path, chans: int = 3, meta: dict | None = None) -> dict:
    """A plain ViT file of STUDY's sizes at 8 px and `chans` channels (zeros; with `meta`: a verified sidecar)."""
    arrays = {k: np.zeros(shape, np.float32)
              for k, shape in encoder_file.plain_vit_state(dict(STUDY, img_size=8, in_chans=chans)).items()}
    if meta is None:
        save_file(arrays, str(path))
    else:
        save_arrays(path, arrays, meta)
    return arrays


def test_a_plain_vit_file_is_checked_without_building_an_encoder(tmp_path, monkeypatch):
    """The plain layouts are written out (plain_vit_state): no Encoder (torch, timm) is built to check them, which
    keeps teacher_swap's start-up light; floating arrays come back float32, others as they are."""
    def refuse(*args):
        raise AssertionError("built an Encoder")

    monkeypatch.setattr(encoder, "encoder_for", refuse)
    arrays = plain_file(tmp_path / "a.safetensors")
    arrays.update(pos_embed=arrays["pos_embed"].astype(np.float16), cls_token=arrays["cls_token"].astype(np.int32))
    save_file(arrays, str(tmp_path / "a.safetensors"))
    got, config, meta = encoder_file.load(tmp_path / "a.safetensors", STUDY, in_chans=3, img_size=8)
    assert list(got) == list(arrays) and meta == {} and (config["in_chans"], config["img_size"]) == (3, 8)
    assert got["pos_embed"].dtype == np.float32 and got["cls_token"].dtype == np.int32


def test_a_file_for_other_images_or_an_encoder_that_cannot_be_built_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "rgb.safetensors"
    plain_file(path, chans=3)
    with pytest.raises(PipelineError) as err:
        encoder_file.load(path, STUDY, in_chans=1, img_size=8)
    assert str(err.value) == (f"{path} takes 3-channel 8px images, but the data has 1-channel 8px images "
                              "(data.channels, data.img_size)")
    other = tmp_path / "other.safetensors"
    plain_file(other, meta={"model": dict(STUDY, arch="no_such_vit", img_size=8, in_chans=3)})
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(other))}: cannot build the encoder its metadata"):
        encoder_file.load(other, STUDY, in_chans=3, img_size=8)


def test_a_mismatch_names_three_keys_of_each_kind_and_counts_the_rest():
    expected = {k: (2,) for k in "abcd"} | {"w": (3, 4)}
    assert encoder_file.state_mismatch(expected, {"d": (2,), "w": (3, 4)}) == "missing: a, b, c"
    assert encoder_file.state_mismatch(expected, {"w": (4, 3), "x": (1,)}) == (
        "missing: a, b, c (+1 more); unexpected: x; shape: w (4, 3) != (3, 4)")
    assert encoder_file.state_mismatch(expected, dict(expected)) == ""
