"""pipeline.models.weights_import's parts, called in-process: reading, finding the encoder's dict in each format's
layout, mapping its keys, inferring and checking the config, the one-line errors.

tests/test_import_weights.py runs the whole CLI in a subprocess for each release layout; these tests check the
same documented properties (and the rest of each function's contract) one function at a time, in this process,
on the same tiny timm ViTs (patch 4, width 32, depth 2, 16 px RGB), so that every branch is reached where a
coverage tool (mutmut's) can see it."""
import argparse
import io
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file
from test_import_weights import SIZES, RunsCode, distilled_deit, encoder_state, mae_decoder, vit

from pipeline.errors import PipelineError
from pipeline.models import weights_import as wi

STUDY = {"arch": "vit_tiny_patch16_224", "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2}
CONFIG = dict(SIZES, arch="vit_tiny_patch16_224")      # what the shapes of vit() describe
T = torch.zeros(2)


def refused(*words):
    """pytest.raises for a PipelineError whose message is one line holding each of `words`."""
    return pytest.raises(PipelineError, match=".*".join(re.escape(w) for w in words))


def one_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and message == message.strip()
    return message


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- one_line, _listing, _is_state ----

def test_one_line_collapses_every_run_of_whitespace_and_takes_any_object():
    assert wi.one_line("a\n  b\t\tc \n") == "a b c"
    assert wi.one_line(ValueError("bad\nheader")) == "bad header"


def test_listing_names_the_first_six_entries_then_counts_the_rest():
    assert wi._listing({}) == "none"
    assert wi._listing({"a": 1, 2: 2}) == "a, 2"
    six = {f"k{i}": i for i in range(6)}
    assert wi._listing(six) == "k0, k1, k2, k3, k4, k5"
    assert wi._listing(six | {"k6": 6, "k7": 7}) == "k0, k1, k2, k3, k4, k5 (+2 more)"
    assert wi._listing(six, n=2) == "k0, k1 (+4 more)"


@pytest.mark.parametrize("obj, state", [
    ({"a": T, "b.c": T}, True),
    ({}, False),                          # empty: no encoder in it
    ({"a": T, "b": 1}, False),            # a number among the tensors: a checkpoint's top level
    ({"a": T, 1: T}, False),              # keys must be names
    ([T], False),
    (None, False),
])
def test_is_state_is_a_non_empty_dict_of_named_tensors(obj, state):
    assert wi._is_state(obj) is state


# ---- read_checkpoint ----

def test_reads_safetensors_and_torch_files_with_argparse_args(tmp_path):
    state = {"a": torch.arange(4.0), "b": torch.ones(2, 2, dtype=torch.int64)}
    save_file(state, str(tmp_path / "x.safetensors"))
    assert same(wi.read_checkpoint(tmp_path / "x.safetensors"), state)
    full = {"model": state, "epoch": 3, "args": argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75)}
    torch.save(full, tmp_path / "x.pth")
    got = wi.read_checkpoint(tmp_path / "x.pth")
    assert same(got["model"], state) and got["epoch"] == 3 and got["args"] == full["args"]


def test_a_torch_file_is_loaded_on_the_cpu(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "load", lambda path, **kw: seen.update(kw) or {"a": T})
    (tmp_path / "x.pth").write_bytes(b"")
    assert wi.read_checkpoint(tmp_path / "x.pth") == {"a": T}
    assert seen == {"map_location": "cpu", "weights_only": True}


def test_a_missing_file(tmp_path):
    with refused("missing file: ", str(tmp_path / "nowhere.pth")) as e:
        wi.read_checkpoint(tmp_path / "nowhere.pth")
    assert one_line_error(e) == f"missing file: {tmp_path / 'nowhere.pth'}"
    (tmp_path / "folder.pth").mkdir()
    with refused("missing file"):
        wi.read_checkpoint(tmp_path / "folder.pth")


def test_an_unreadable_safetensors_file(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"not\nsafetensors")
    with refused(f"{path} is not a readable safetensors file (", "header", ")") as e:
        wi.read_checkpoint(path)
    one_line_error(e)
    import safetensors.torch

    for error in (OSError("Input/output\nerror"), ValueError("bad dtype")):
        def failing(_, error=error):
            raise error
        monkeypatch.setattr(safetensors.torch, "load_file", failing)
        with refused(f"{path} is not a readable safetensors file ({wi.one_line(error)})") as e:
            wi.read_checkpoint(path)
        one_line_error(e)


def test_a_pickle_that_needs_code_is_refused_naming_the_global(tmp_path):
    torch.save({"model": vit(), "hook": RunsCode()}, tmp_path / "evil.pth")
    with refused(f"{tmp_path / 'evil.pth'} refused: unpickling it would run code (it needs ", "system);",
                 "only tensors and plain containers are loaded (torch.load weights_only=True): ",
                 "save its state dict alone (or as safetensors) and import that") as e:
        wi.read_checkpoint(tmp_path / "evil.pth")
    one_line_error(e)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "print.pth").write_bytes(b"\x80\x02cbuiltins\nprint\nq\x00.")       # a bare pickle of a global
    with refused("refused: unpickling it would run code (it needs print)"):
        wi.read_checkpoint(tmp_path / "print.pth")


def test_a_pickle_of_other_objects_is_refused(tmp_path):
    (tmp_path / "ns.pth").write_bytes(pickle.dumps(argparse.Namespace(a=1)))       # not a torch file, no GLOBAL
    with refused(f"{tmp_path / 'ns.pth'} refused: unpickling it would run code (it holds objects other than "
                 "tensors); only tensors") as e:
        wi.read_checkpoint(tmp_path / "ns.pth")
    one_line_error(e)


def test_a_file_torch_cannot_read(tmp_path, monkeypatch):
    (tmp_path / "empty.pth").write_bytes(b"")
    with refused(f"{tmp_path / 'empty.pth'} is not a readable torch checkpoint (EOFError: ") as e:
        wi.read_checkpoint(tmp_path / "empty.pth")
    one_line_error(e)
    (tmp_path / "plain.pth").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with refused("is not a readable torch checkpoint (RuntimeError: Invalid magic number; corrupt file?)"):
        wi.read_checkpoint(tmp_path / "plain.pth")

    # an UnpicklingError that is not weights_only's refusal is unreadable, not refused
    def fails(*_, **__):
        raise pickle.UnpicklingError("truncated\n" + "x" * 300)
    monkeypatch.setattr(torch, "load", fails)
    with pytest.raises(PipelineError) as e:
        wi.read_checkpoint(tmp_path / "plain.pth")
    cause = wi.one_line("truncated\n" + "x" * 300)[:200]                 # the cause, cut to 200 characters
    path = tmp_path / "plain.pth"
    assert one_line_error(e) == f"{path} is not a readable torch checkpoint (UnpicklingError: {cause})"


# ---- find_state: each format's entries, first found first ----

def test_find_state_takes_each_formats_entries_in_order(tmp_path):
    a, b, c, d = ({"w": torch.full((1,), float(i))} for i in range(4))
    timm_ckpt = {"model": d, "state_dict": c, "model_ema": b, "state_dict_ema": a, "epoch": 1}
    for entry in ("state_dict_ema", "model_ema", "state_dict", "model"):
        state, found = wi.find_state(timm_ckpt, "timm", tmp_path)
        assert found == entry and same(state, timm_ckpt[entry])
        assert type(state) is dict and state is not timm_ckpt[entry]        # a copy: mapping it leaves the file's
        del timm_ckpt[entry]
    dino = {"student": b, "teacher": a, "epoch": 3}
    assert wi.find_state(dino, "dino", tmp_path)[1] == "teacher"
    assert wi.find_state({"student": b}, "dino", tmp_path) == (b, "student")
    for fmt in ("mae", "deit"):
        assert wi.find_state({"state_dict": c, "model": d}, fmt, tmp_path)[1] == "model"


def test_find_state_skips_entries_that_are_not_dicts_of_tensors(tmp_path):
    ckpt = {"state_dict_ema": {}, "model_ema": {"w": T, "n": 1}, "state_dict": {"w": T}}
    assert wi.find_state(ckpt, "timm", tmp_path)[1] == "state_dict"


def test_find_state_falls_back_to_a_plain_dict(tmp_path):
    state = {"model.w": T, "teacher": T}       # a state dict whose keys happen to be entry names
    got, entry = wi.find_state(state, "dino", tmp_path)
    assert entry == "" and same(got, state) and type(got) is dict


def test_find_state_with_entry_takes_that_one(tmp_path):
    ckpt = {"teacher": {"w": T}, "student": {"w": torch.ones(2)}}
    state, entry = wi.find_state(ckpt, "dino", tmp_path, entry="student")
    assert entry == "student" and same(state, ckpt["student"]) and state is not ckpt["student"]
    with refused(f"{tmp_path} has no dict of tensors under --entry 'model' (its entries: teacher, student)") as e:
        wi.find_state(ckpt, "dino", tmp_path, entry="model")
    one_line_error(e)
    with refused("under --entry 'epoch'"):
        wi.find_state(ckpt | {"epoch": 3}, "dino", tmp_path, entry="epoch")


def test_find_state_without_an_encoder(tmp_path):
    with refused(f"{tmp_path}: no dino encoder in it: a dino checkpoint is a dict of tensors or keeps one under "
                 "teacher / student (its entries: epoch, optimizer)") as e:
        wi.find_state({"epoch": 3, "optimizer": {}}, "dino", tmp_path)
    one_line_error(e)
    with refused("under state_dict_ema / model_ema / state_dict / model (its entries: none)"):
        wi.find_state({}, "timm", tmp_path)
    with refused(f"{tmp_path} holds a list, not a dict of tensors: no mae encoder in it"):
        wi.find_state([vit()], "mae", tmp_path)


# ---- map_state ----

def test_mae_drops_the_decoder_and_mask_token():
    tensors, record = wi.map_state(vit() | mae_decoder(), "mae", "x")
    assert same(tensors, encoder_state())
    assert record == {"kept": len(encoder_state()), "renamed": 0, "dropped": 8, "dropped_groups": {"decoder": 8},
                      "prefixes_removed": {}, "source_dtypes": ["float32"], "notes": []}


def test_the_drop_patterns_are_anchored():
    # an encoder key with a drop group's name inside it is kept (and then fails the shape check, not silently lost)
    keys = {"blocks.0.head.w": T, "mask_token_2": T, "x.decoder_w": T, "heads.w": T}
    assert wi.map_state(keys, "mae", "x")[0].keys() == keys.keys()
    assert wi.map_state({"x.head_dist.w": T, "pre_logits.w": T}, "deit", "x")[0].keys() == {"x.head_dist.w",
                                                                                            "pre_logits.w"}


@pytest.mark.parametrize("fmt, extra, groups", [
    ("mae", {"head.weight": T, "mask_token": T}, {"head": 1, "decoder": 1}),
    ("deit", {"head.weight": T, "head.bias": T, "head_dist.weight": T}, {"head": 2, "head_dist": 1}),
    ("dino", {"head.mlp.0.weight": T, "head.last_layer.weight_g": T}, {"head": 2}),
    ("timm", {"head.weight": T, "pre_logits.fc.weight": T, "pre_logits.fc.bias": T}, {"head": 1, "pre_logits": 2}),
])
def test_each_format_drops_its_groups(fmt, extra, groups):
    tensors, record = wi.map_state(encoder_state() | extra, fmt, "x")
    assert same(tensors, encoder_state())
    assert record["dropped_groups"] == groups and record["dropped"] == len(extra)
    assert record["kept"] == len(encoder_state())


def test_other_formats_drop_groups_are_kept():
    # the decoder of mae is not a timm group: a timm file with one fails the shape check instead
    kept = wi.map_state({"mask_token": T, "decoder_embed.weight": T, "head_dist.w": T}, "timm", "x")[0]
    assert kept.keys() == {"mask_token", "decoder_embed.weight", "head_dist.w"}
    assert wi.map_state({"pre_logits.w": T}, "dino", "x")[0].keys() == {"pre_logits.w"}


@pytest.mark.parametrize("fmt, prefixes", [
    ("mae", ("module.",)), ("deit", ("module.",)), ("dino", ("module.", "backbone.")),
    ("timm", ("module.", "_orig_mod.")),
])
def test_each_formats_prefixes_are_taken_off_in_any_order(fmt, prefixes):
    state = encoder_state()
    wrapped = {"".join(prefixes if i % 2 else reversed(prefixes)) + k: v for i, (k, v) in enumerate(state.items())}
    tensors, record = wi.map_state(wrapped, fmt, "x")
    assert same(tensors, state) and list(tensors) == list(state)
    assert record["renamed"] == len(state) and record["prefixes_removed"] == {p: len(state) for p in prefixes}
    assert record["kept"] == len(state) and record["dropped"] == 0


def test_a_prefix_is_taken_off_only_at_the_start_and_only_the_formats_own():
    tensors, record = wi.map_state({"blocks.module.w": T, "backbone.w": T, "_orig_mod.v": T}, "mae", "x")
    assert tensors.keys() == {"blocks.module.w", "backbone.w", "_orig_mod.v"}
    assert record["renamed"] == 0 and record["prefixes_removed"] == {}
    tensors, record = wi.map_state({"module.module.w": T, "module.head.w": T}, "deit", "x")
    assert tensors.keys() == {"w"} and record["prefixes_removed"] == {"module.": 3}
    assert record["dropped_groups"] == {"head": 1} and record["renamed"] == 1


def test_two_keys_that_map_to_one_name_are_refused():
    with refused("ckpt.pth: two keys map to cls_token once prefixes are removed (module.cls_token)") as e:
        wi.map_state({"cls_token": T, "module.cls_token": T}, "timm", "ckpt.pth")
    one_line_error(e)


def test_a_distilled_deit_is_refused_naming_its_dist_token():
    with refused("d.pth is a distilled model (dist_token, (1, 1, 32)): this encoder has one class token and no "
                 "place for the distillation token; pass --drop-dist-token to drop it and its pos_embed row (the "
                 "features then differ from the distilled model's)") as e:
        wi.map_state(distilled_deit()["model"], "deit", "d.pth")
    one_line_error(e)


def test_drop_dist_token_drops_it_and_its_pos_embed_row():
    state = distilled_deit()["model"]
    tensors, record = wi.map_state(state, "deit", "d.pth", drop_dist_token=True)
    assert same(tensors, encoder_state(num_classes=10))       # cls row and patch rows kept, row 1 (dist) gone
    assert record["dropped_groups"] == {"head": 2, "head_dist": 2, "dist_token": 1} and record["dropped"] == 5
    assert record["kept"] == len(encoder_state())
    assert record["notes"] == ["dist_token dropped with its pos_embed row (index 1): the encoder attends to the class "
                               "token and patches only, so its features differ from the distilled model's"]


def test_drop_dist_token_with_a_pos_embed_of_only_the_two_tokens_and_without_one():
    pos = torch.arange(2.0).view(1, 2, 1)
    tensors, record = wi.map_state({"dist_token": T, "pos_embed": pos}, "deit", "x", drop_dist_token=True)
    assert torch.equal(tensors["pos_embed"], pos[:, :1]) and len(record["notes"]) == 1
    tensors, record = wi.map_state({"dist_token": T, "cls_token": T}, "deit", "x", drop_dist_token=True)
    assert tensors.keys() == {"cls_token"} and record["notes"] == [] and record["dropped_groups"] == {"dist_token": 1}
    odd = {"dist_token": T, "pos_embed": torch.ones(1, 1, 3)}         # not (1, 2+, D): left for the shape check
    assert torch.equal(wi.map_state(odd, "deit", "x", drop_dist_token=True)[0]["pos_embed"], torch.ones(1, 1, 3))
    flat = {"dist_token": T, "pos_embed": torch.ones(5, 3)}
    assert torch.equal(wi.map_state(flat, "deit", "x", drop_dist_token=True)[0]["pos_embed"], torch.ones(5, 3))


def gap_model():
    state = vit()
    state["fc_norm.weight"], state["fc_norm.bias"] = state.pop("norm.weight"), state.pop("norm.bias")
    return state


def test_a_global_pool_fc_norm_is_refused_unless_used_as_the_final_norm():
    with refused("gap.pth is a global-average-pool model (fc_norm.weight, fc_norm.bias, no norm.*): its norm comes "
                 "after pooling, this encoder's final norm is on every token; pass --fc-norm-as-norm to use it as "
                 "the final norm (the features then differ)") as e:
        wi.map_state(gap_model(), "timm", "gap.pth")
    one_line_error(e)
    tensors, record = wi.map_state(gap_model(), "timm", "gap.pth", fc_norm_as_norm=True)
    assert same(tensors, encoder_state())
    assert record["renamed"] == 2 and record["kept"] == len(encoder_state()) and record["dropped"] == 0
    assert record["notes"] == ["fc_norm (norm after average pooling) used as norm (the final norm of every token)"]
    wrapped = {(k if k.startswith("fc_norm.") else f"module.{k}"): v for k, v in gap_model().items()}
    tensors, record = wi.map_state(wrapped, "timm", "gap.pth", fc_norm_as_norm=True)
    assert same(tensors, encoder_state()) and record["renamed"] == len(wrapped)      # each key renamed once
    wrapped = {f"module.{k}": v for k, v in gap_model().items()}                   # fc_norm.* under the prefix too
    tensors, record = wi.map_state(wrapped, "timm", "gap.pth", fc_norm_as_norm=True)
    assert same(tensors, encoder_state()) and record["renamed"] == len(wrapped)


def test_an_fc_norm_beside_a_norm_is_dropped():
    state = vit() | {"fc_norm.weight": torch.ones(32), "fc_norm.bias": torch.zeros(32)}
    for flag in (False, True):
        tensors, record = wi.map_state(state, "timm", "x", fc_norm_as_norm=flag)
        assert same(tensors, encoder_state())
        assert record["dropped_groups"] == {"fc_norm": 2} and record["dropped"] == 2 and record["renamed"] == 0


def test_every_floating_tensor_is_stored_as_contiguous_float32_others_keep_their_dtype():
    state = {"a": torch.ones(2, 3, dtype=torch.bfloat16).t(), "b": torch.ones(2, dtype=torch.float16),
             "c": torch.arange(6).view(2, 3).t(), "d": torch.ones(2, dtype=torch.float64)}
    tensors, record = wi.map_state(state, "timm", "x")
    assert {k: v.dtype for k, v in tensors.items()} == {"a": torch.float32, "b": torch.float32, "c": torch.int64,
                                                        "d": torch.float32}
    assert all(v.is_contiguous() for v in tensors.values())
    assert all(torch.equal(tensors[k], state[k].to(tensors[k].dtype)) for k in state)
    assert record["source_dtypes"] == ["bfloat16", "float16", "float64", "int64"]


# ---- infer_config, check_shapes, describe ----

def test_infer_config_reads_the_sizes_from_the_shapes():
    config, source = wi.infer_config(encoder_state(), "x", STUDY)
    assert config == dict(SIZES, arch=STUDY["arch"])        # width 32: the study's width, its 2 heads
    assert source == "params model.num_heads (same width)"
    grey = encoder_state(img_size=8, patch_size=2, in_chans=1, depth=3)
    assert wi.infer_config(grey, "x", STUDY)[0] == dict(SIZES, img_size=8, patch_size=2, in_chans=1, depth=3,
                                                       arch=STUDY["arch"])


def test_infer_config_of_a_standard_width_names_timms_arch_and_head_count():
    state = encoder_state(embed_dim=192, patch_size=16, img_size=16, depth=1, num_heads=3)
    config, source = wi.infer_config(state, "x", dict(STUDY, arch="deit_small_patch16_224"))
    assert config["arch"] == "vit_tiny_patch16_224" and config["num_heads"] == 3      # timm's, not the study's
    assert source == "timm's ViT-tiny for width 192"
    assert wi.infer_config(state, "x", STUDY, num_heads=1) == (dict(config, num_heads=1), "--num-heads")
    # a patch size timm has no plain arch of: the study's arch (the family), sizes passed
    other = encoder_state(embed_dim=192, patch_size=4, img_size=8, depth=1, num_heads=3)
    config, source = wi.infer_config(other, "x", dict(STUDY, arch="deit_tiny_patch16_224"))
    assert config["arch"] == "deit_tiny_patch16_224" and (config["num_heads"], source[:11]) == (3, "timm's ViT-")


def test_standard_widths_and_heads():
    assert {w: h for w, (_, h) in wi.STANDARD.items()} == {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def test_num_heads_is_asked_for_at_an_unknown_width():
    state = encoder_state(embed_dim=48, num_heads=4)
    with refused("x.pth: the head count of a 48-wide ViT cannot be read from its shapes; pass --num-heads") as e:
        wi.infer_config(state, "x.pth", STUDY)
    one_line_error(e)
    assert wi.infer_config(state, "x.pth", STUDY, num_heads=4) == (dict(SIZES, embed_dim=48, num_heads=4,
                                                                        arch=STUDY["arch"]), "--num-heads")
    assert wi.infer_config(state, "x.pth", dict(STUDY, embed_dim=48, num_heads=3))[0]["num_heads"] == 3


@pytest.mark.parametrize("heads", [0, -2, 3, 64])
def test_a_head_count_that_does_not_divide_the_width_is_refused(heads):
    with refused(f"x.pth: {heads} heads do not divide the width 32 (--num-heads)") as e:
        wi.infer_config(encoder_state(), "x.pth", STUDY, num_heads=heads)
    one_line_error(e)


def test_one_head_and_one_head_per_channel_are_accepted():
    assert wi.infer_config(encoder_state(), "x", STUDY, num_heads=1)[0]["num_heads"] == 1
    assert wi.infer_config(encoder_state(), "x", STUDY, num_heads=32)[0]["num_heads"] == 32
    assert wi.infer_config(encoder_state(), "x", dict(STUDY, num_heads=32))[0]["num_heads"] == 32


def test_a_file_without_a_vit_encoder():
    with refused("x.pth: no ViT encoder in it (no cls_token, pos_embed, patch_embed.proj.weight; its keys: "
                 "foo.weight)") as e:
        wi.infer_config({"foo.weight": T}, "x.pth", STUDY)
    one_line_error(e)
    state = encoder_state()
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        with refused(f"(no {key}; its keys: "):
            wi.infer_config({k: v for k, v in state.items() if k != key}, "x.pth", STUDY)


def test_a_patch_embedding_that_is_not_a_square_conv():
    state = encoder_state()
    for shape in ((32, 3, 4, 2), (32, 48)):
        with refused(f"x.pth: patch_embed.proj.weight {shape} is not a square-patch conv "
                     "(embed_dim, channels, patch, patch)") as e:
            wi.infer_config(state | {"patch_embed.proj.weight": torch.zeros(shape)}, "x.pth", STUDY)
        one_line_error(e)


@pytest.mark.parametrize("shape", [(1, 16, 32), (1, 18, 32), (17, 32), (1, 0, 32)])
def test_a_pos_embed_that_is_not_a_class_token_and_a_square_grid(shape):
    with refused(f"x.pth: pos_embed {shape} is not a class token plus a square grid of patch positions "
                 "(1, 1 + n*n, embed_dim)") as e:
        wi.infer_config(encoder_state() | {"pos_embed": torch.zeros(shape)}, "x.pth", STUDY)
    one_line_error(e)


def test_a_pos_embed_of_the_class_token_alone_describes_no_image():
    # a grid of no patches (0 px images): no encoder can be built for it
    with refused("x.pth: cannot build the encoder its metadata describes (") as e:
        wi.infer_config(encoder_state() | {"pos_embed": torch.zeros(1, 1, 32)}, "x.pth", STUDY)
    one_line_error(e)


def test_a_grid_of_one_patch_and_no_blocks():
    state = {k: v for k, v in encoder_state(img_size=4).items() if not k.startswith("blocks.")}
    config = wi.infer_config(state, "x", STUDY)[0]
    assert (config["img_size"], config["depth"]) == (4, 0)


def test_the_shapes_are_checked_before_the_head_count():
    state = encoder_state(embed_dim=48, num_heads=4)
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 48)
    with refused("x.pth does not fit a plain ViT (width 48, depth 2, 4px patches, 16px 3-channel images): "
                 "shape: blocks.1.mlp.fc1.weight (100, 48) != (192, 48)") as e:
        wi.infer_config(state, "x.pth", STUDY)
    one_line_error(e)


def test_check_shapes_names_every_kind_of_misfit():
    state = encoder_state()
    wi.check_shapes(state, CONFIG, "x")
    wi.check_shapes(state, dict(CONFIG, num_heads=None), "x")              # shapes do not depend on heads
    bad = {k: v for k, v in state.items() if k != "norm.bias"} | {"blocks.0.ls1.gamma": torch.ones(32),
                                                                  "cls_token": torch.zeros(1, 2, 32)}
    with refused("x.pth does not fit a plain ViT (width 32, depth 2, 2 heads, 4px patches, 16px 3-channel images): "
                 "missing: norm.bias; unexpected: blocks.0.ls1.gamma; shape: cls_token (1, 2, 32) != (1, 1, 32)") as e:
        wi.check_shapes(bad, CONFIG, "x.pth")
    one_line_error(e)
    with refused("missing: blocks.2."):                                     # one block fewer than the config says
        wi.check_shapes(state, dict(CONFIG, depth=3), "x.pth")


def test_check_shapes_of_another_arch_asks_timm():
    # an arch pipeline.models.encoder_file does not write out: the Encoder timm builds for it says what it holds
    config = dict(CONFIG, arch="deit_tiny_patch16_224")
    wi.check_shapes(encoder_state(), config, "x")
    wi.check_shapes(encoder_state(), dict(config, num_heads=None), "x")
    with refused("x.pth does not fit a plain ViT (width 32, depth 2, 2 heads, ", "unexpected: blocks.0.ls1.gamma"):
        wi.check_shapes(encoder_state() | {"blocks.0.ls1.gamma": torch.ones(32)}, config, "x.pth")
    pre_norm = dict(CONFIG, arch="vit_base_patch16_clip_224")           # a norm before the blocks as well
    with refused("missing: norm_pre.weight, norm_pre.bias"):
        wi.check_shapes(encoder_state(), pre_norm, "x.pth")


def test_check_shapes_of_a_plain_vit_builds_no_encoder(monkeypatch):
    # its layout is written out in pipeline.models.encoder_file: no timm model is built to learn it
    from pipeline.models import encoder

    def no_build(path, model):
        raise AssertionError(f"built an encoder for {path}")
    monkeypatch.setattr(encoder, "encoder_for", no_build)
    wi.check_shapes(encoder_state(), CONFIG, "x")
    with refused("missing: blocks.2."):
        wi.check_shapes(encoder_state(), dict(CONFIG, depth=3), "x.pth")


def test_check_shapes_of_an_arch_that_cannot_be_built_names_the_file():
    with refused("x.pth: cannot build the encoder its metadata describes (") as e:
        wi.check_shapes(encoder_state(), dict(CONFIG, arch="no_such_vit"), "x.pth")
    one_line_error(e)


def test_describe():
    assert wi.describe(CONFIG) == "width 32, depth 2, 2 heads, 4px patches, 16px 3-channel images"
    assert wi.describe(dict(CONFIG, num_heads=None)) == "width 32, depth 2, 4px patches, 16px 3-channel images"
    assert wi.describe({k: v for k, v in CONFIG.items() if k != "num_heads"}) == wi.describe(dict(CONFIG,
                                                                                              num_heads=None))


# ---- params_mismatch ----

def test_params_mismatch_of_the_geometry_and_of_the_whole_model():
    config = dict(SIZES, embed_dim=64, depth=3, num_heads=1)
    assert wi.params_mismatch(config, STUDY, 8, 1, "geometry") == [
        "data.img_size 8 (file: 16)", "model.patch_size 2 (file: 4)", "data.channels 1 (file: 3)"]
    assert wi.params_mismatch(config, STUDY, 8, 1, "model") == [
        "data.img_size 8 (file: 16)", "model.patch_size 2 (file: 4)", "data.channels 1 (file: 3)",
        "model.embed_dim 32 (file: 64)", "model.depth 2 (file: 3)", "model.num_heads 2 (file: 1)"]
    same_model = dict(SIZES, img_size=8, patch_size=2, in_chans=1)
    assert wi.params_mismatch(same_model, STUDY, 8, 1, "model") == []
    assert wi.params_mismatch(dict(same_model, depth=5), STUDY, 8, 1, "geometry") == []


# ---- the parts together: each release layout, read from its file ----

@pytest.mark.parametrize("fmt, ckpt, entry, expected", [
    ("mae", lambda: {"model": vit() | mae_decoder(), "optimizer": {"state": {}}, "epoch": 799,
                     "args": argparse.Namespace(model="mae_vit_tiny")}, "model", encoder_state),
    ("deit", lambda: {"model": vit(num_classes=10)}, "model", lambda: encoder_state(num_classes=10)),
    ("dino", lambda: {"teacher": {f"backbone.{k}": v for k, v in vit(seed=1).items()},
                      "student": {f"module.backbone.{k}": v for k, v in vit(seed=2).items()}},
     "teacher", lambda: encoder_state(seed=1)),
    ("timm", lambda: {"state_dict_ema": {f"module.{k}": v for k, v in vit(seed=3).items()},
                      "state_dict": {f"module.{k}": v for k, v in vit(seed=4).items()}},
     "state_dict_ema", lambda: encoder_state(seed=3)),
])
def test_a_release_layout_read_found_mapped_and_checked(tmp_path, fmt, ckpt, entry, expected):
    buffer = io.BytesIO()
    torch.save(ckpt(), buffer)
    (tmp_path / "ckpt.pth").write_bytes(buffer.getvalue())
    state, found = wi.find_state(wi.read_checkpoint(tmp_path / "ckpt.pth"), fmt, tmp_path / "ckpt.pth")
    tensors, _ = wi.map_state(state, fmt, tmp_path / "ckpt.pth")
    config, _ = wi.infer_config(tensors, tmp_path / "ckpt.pth", STUDY)
    assert found == entry and same(tensors, expected()) and config == dict(SIZES, arch=STUDY["arch"])
