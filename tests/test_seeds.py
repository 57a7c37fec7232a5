"""Every stochastic node of the DAG draws from seeds of its own (pipeline.config.node_seed), for every study seed.

seed_table lists, for study seeds 0 and 1 of the default and tiny presets, every seed each node passes to
torch.manual_seed or torch.Generator.manual_seed: recorded while the training nodes' models are built (encoder,
decoder or head, SdAE's random teacher) and the linear probe runs, and the other nodes' seeds from the functions
their stages call; with_streams also every seed of the training engine's streams (the per-step generators and
the per-epoch sample orders, pipeline.train.engine) of every training node and of finetune, over all their steps.
No seed may be used by two nodes, except where they share it on purpose: random_init and dBOT stage 0 (the stage-0
teacher is the student's own init), the chains of one dBOT stage (they differ only in their teacher), and one
protocol's seed across the encoders it evaluates (every encoder gets the same probe).
"""
import contextlib
from argparse import Namespace

import pytest
import torch

from pipeline import config, layout
from pipeline.data.steps import epoch_order
from pipeline.evaluation import finetune, robustness
from pipeline.methods import METHODS
from pipeline.models.encoder import build_encoder
from pipeline.models.teacher import FrozenTeacher
from pipeline.stages.evaluation import linprobe
from pipeline.stages.training import pretrain
from pipeline.train import engine

IMAGES = {"mnist5k": 5000, "digits": 1797}   # every image of the source: more steps than its train split gives, so
                                             # the streams recorded hold the real ones

PROTOCOLS = ("linprobe", "segprobe", "finetune", "robustness")


@contextlib.contextmanager
def recording(seen: set):
    """Record every seed given to torch.manual_seed and torch.Generator.manual_seed inside the block."""
    manual, generator = torch.manual_seed, torch.Generator

    class Recorded(generator):
        def manual_seed(self, s):
            seen.add(int(s))
            return super().manual_seed(s)

    torch.manual_seed = lambda s: seen.add(int(s)) or manual(s)
    torch.Generator = Recorded
    try:
        yield seen
    finally:
        torch.manual_seed, torch.Generator = manual, generator


def built(params: dict, method: str, stage: int = 0, **override) -> set[int]:
    """The seeds a training node's model takes when the pretrain stage builds it (node_seed, as pretrain.work)."""
    p = config.merge(params, {method: override}) if override else params
    m, d = p["model"], p["data"]
    teacher = FrozenTeacher(build_encoder(m, d["img_size"], d["channels"], 0)) if method == "dbot" else None
    extra = {"num_classes": 10} if method == "supervised" else {}
    with recording(set()) as seen:
        METHODS[method](p, d["channels"], config.node_seed(p, method, stage), teacher, **extra)
    return seen


def probed(params: dict) -> set[int]:
    """The seeds the linear probe draws from (linprobe.protocol, also run by checkpoint_eval)."""
    gen = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(32, 8, generator=gen), torch.arange(32) % 4
    with recording(set()) as seen:
        linprobe.protocol(config.merge(params, {"linprobe": {"epochs": 1}}), feats, labels, feats, labels, 4)
    return seen


def streams(seed: int, epochs: int, batch_size: int, images: int, step_seeds=engine.step_generator) -> set[int]:
    """The seeds of a training run's streams: engine.step_generator (or finetune.seed_step) at every step and
    data.steps.epoch_order at every epoch, as engine.train and finetune.finetune call them."""
    steps = epochs * (images // min(batch_size, images))
    with recording(set()) as seen, finetune.restored_rng():
        for step in range(steps):
            step_seeds(seed, step)
        for epoch in range(epochs):
            epoch_order(1, seed, epoch)
    return seen


def node_streams(params: dict, method: str, key: str | None = None) -> set[int]:
    """The engine's stream seeds of a training node, on its own schedule (pretrain.settings)."""
    s = pretrain.settings(params, Namespace(method=method, stage=key))
    stage = layout.parse_dbot_key(key)[1] if key else 0
    return streams(config.node_seed(params, method, stage), s["epochs"], s["batch_size"],
                   IMAGES[params["data"]["dataset"]])


def seed_table(params: dict, with_streams: bool = False) -> dict[str, set[int]]:
    """node id -> every seed it uses, for study seed params["seed"] (with_streams: and its engine streams)."""
    s = params["seed"]
    table = {layout.node_id("random_init", s): {config.node_seed(params, "random_init")}}
    for method in layout.SINGLE_STAGE_METHODS + ("supervised",):
        table[layout.pretrain_node(method, s)] = built(params, method) | (
            node_streams(params, method) if with_streams else set())
    table[f"sdae teacher@seed{s}"] = built(params, "sdae", teacher_init="random") - built(params, "sdae")
    stages = {k: built(params, "dbot", k) for k in layout.dbot_stages(params)}
    for key in layout.dbot_keys(params):
        table[layout.pretrain_node("dbot", s, key)] = stages[layout.parse_dbot_key(key)[1]] | (
            node_streams(params, "dbot", key) if with_streams else set())
    table[f"pictures@seed{s}"] = {config.node_seed(params, "pictures")}   # every training node's reconstruction.png
    weights = {"linprobe": layout.probe_weights(params), "segprobe": layout.all_weights(params),
               "finetune": layout.finetune_weights(params), "robustness": layout.finetune_weights(params)}
    linear = probed(params)
    noise = {robustness.noise_seed(config.node_seed(params, "robustness"), name, level)
             for name in params["robustness"]["corruptions"] for level in params["robustness"]["severities"]}
    tuned = {config.node_seed(params, "finetune")}
    if with_streams:
        f = params["finetune"]
        tuned |= streams(config.node_seed(params, "finetune"), f["epochs"], f["batch_size"],
                         IMAGES[params["data"]["dataset"]], finetune.seed_step)
    seeds = {"linprobe": linear, "segprobe": {config.node_seed(params, "segprobe")}, "finetune": tuned,
             "robustness": noise}
    for protocol in PROTOCOLS:
        for w in weights[protocol]:
            table[layout.node_id(protocol, s, w)] = seeds[protocol]
    return table


def share_group(node: str) -> str:
    """The nodes that share seeds on purpose have one group: random_init with every chain's dBOT stage 0, the
    chains of a dBOT stage, a protocol's nodes of one study seed; any other node is its own group."""
    family, _, rest = node.partition("@")
    seed, _, key = rest.partition("-")
    if family in PROTOCOLS:
        return f"{family}@{seed}"
    if family == "random_init":
        return f"dbot stage 0@{seed}"
    if family == "pretrain_dbot":
        return f"dbot stage {layout.parse_dbot_key(key)[1]}@{seed}"
    return node


@pytest.mark.parametrize("preset", ["default", "tiny"])
def test_no_two_nodes_share_a_seed_unless_on_purpose(preset):
    """Inits, masks, crops, drop paths and sample orders: every seed of every node, engine streams included."""
    params = config.load(preset, ["seeds=[0, 1]"])
    table = {}
    for s in (0, 1):
        table.update(seed_table(config.with_seed(params, s), with_streams=True))
    users = {}
    for node, seeds in table.items():
        assert seeds, f"{node} records no seed"
        for seed in seeds:
            users.setdefault(seed, set()).add(node)
    shared = {seed: sorted(nodes) for seed, nodes in users.items() if len({share_group(n) for n in nodes}) > 1}
    assert not shared, shared
    # the collision that was: SdAE's random teacher had 1000 S + 2, the seed of dBOT stage 2's student
    teacher = table["sdae teacher@seed0"]
    assert len(teacher) == 1 and not teacher & set().union(*(v for k, v in table.items() if k != "sdae teacher@seed0"))
    assert table["random_init@seed1"] <= table["pretrain_dbot@seed1-random_stage0"]     # the stage-0 teacher's init
    assert len({frozenset(table[layout.pretrain_node(m, 0)]) for m in ("mae", "sdae", "rcmae", "bootmae")}) == 4
    # the collision that was: study seed 0's dBOT stage 0 (node seed 0) drew steps 0, 1, ... and epoch orders 1, 2,
    # ...: every other node's own seeds (engine.stream_key)
    stage0 = table[layout.pretrain_node("dbot", 0, layout.dbot_keys(params)[0])]
    assert min(stage0 - {0, 1}) > 1000


def test_the_seed_block_holds_every_offset():
    """Each study seed's seeds stay inside its block of 1000, so two study seeds never meet."""
    params = config.load("default", ["seeds=[0, 1]"])
    table = seed_table(config.with_seed(params, 1))
    assert all(1000 <= seed < 2000 for seeds in table.values() for seed in seeds), table
    with pytest.raises(Exception, match="at most 50 stages"):
        config.load("tiny",
                    ["dbot.stages={" + ", ".join(f"stage{k}: {{epochs: 1, blr: 1.0}}" for k in range(51)) + "}"])
