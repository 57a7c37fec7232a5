from pathlib import Path

import pytest

from pipeline import config
from pipeline.errors import PipelineError

INVALID = sorted(Path("tests/invalid_params").glob("*.yaml"))


@pytest.mark.parametrize("preset", config.presets())
def test_presets_resolve(preset, tmp_path, monkeypatch):
    external = preset in ("cifar10", "imagenet")       # their data.path is not here: planning needs only params
    params = config.load(preset, check_paths=not external)
    assert params["study"]


def test_every_base_key_has_a_comment():
    lines = [line for line in config.BASE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#") and ":" in line]
    uncommented = [line for line in lines if "#" not in line and not line.rstrip().endswith(":")
                   and not line.strip().startswith("stage")]
    assert not uncommented, uncommented


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_params_give_their_one_line_error(path):
    expected = path.read_text().splitlines()[0].removeprefix("# error: ")
    with pytest.raises(PipelineError) as err:
        config.load("tiny", files=[path])
    message = str(err.value)
    assert expected in message
    assert "\n" not in message and str(path) in message


def test_there_are_many_invalid_cases():
    assert len(INVALID) >= 20


def test_overrides_parse_as_data_not_code():
    p = config.load("tiny", ["pretrain.epochs=5"])
    assert p["pretrain"]["epochs"] == 5
    with pytest.raises(PipelineError,
                       match="data.split_seed: \"__import__\\('os'\\).getpid\\(\\)\" is not of type 'integer'"):
        config.load("tiny", ["data.split_seed=__import__('os').getpid()"])


def test_seeds_are_a_list_and_each_node_runs_one_of_them():
    p = config.load("tiny", ["seeds=[3, 5]"])
    assert p["seeds"] == [3, 5] and p["seed"] == 3                     # a node's seed: the first unless --seed
    assert config.with_seed(p, 5)["seed"] == 5 and config.node_seed(config.with_seed(p, 5), "dbot", 2) == 5020
    with pytest.raises(PipelineError, match=r"seed 4 is not one of this study's seeds \[3, 5\]"):
        config.with_seed(p, 4)
    with pytest.raises(PipelineError, match="seed is not a params key; the study's seeds are `seeds"):
        config.load("tiny", ["seed=1"])


def test_unknown_preset():
    with pytest.raises(PipelineError, match="unknown preset 'huge'.*tiny"):
        config.load("huge")


def test_section_hash_tracks_only_named_sections():
    a = config.load("tiny")
    b = config.load("tiny", ["linprobe.lr=0.5"])
    assert config.section_hash(a, ["pretrain"]) == config.section_hash(b, ["pretrain"])
    assert config.section_hash(a, ["linprobe"]) != config.section_hash(b, ["linprobe"])
