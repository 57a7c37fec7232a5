"""Every stochastic node of the DAG draws from seeds of its own (pipeline.config.node_seed), for every study seed.

The tiny preset's table holds what the nodes really do: its stochastic nodes (random_init, every training node,
teacher_swap between the dBOT stages, and linprobe, segprobe, finetune and robustness on random_init's encoder) run
in-process through their own CLIs, as a DAG tool's jobs run them, for study seeds 0 and 1, and every seed given to
torch.manual_seed or torch.Generator.manual_seed while a node runs is recorded as that node's: its model's init, its
engine's streams (the per-step generators and the per-epoch sample orders, pipeline.train.engine) over all its steps,
the probes' and fine-tuning's draws, the corruption noise; the masks of the training nodes' reconstruction pictures
(pipeline.reporting.figures.reconstruction_grid) as one node of their own, "pictures". A stage that passes a wrong
seed (another node's, the study's, a constant) makes its seeds meet another node's or differ from node_seed's.
The default preset is too large to run here: its table is computed (seed_table: the models built as the pretrain
stage builds them, the linear probe run, the other seeds from node_seed and the engine's stream functions, over
every image of the source), and test_the_recorded_seeds_are_the_computed_ones shows, on the tiny preset, that the
computed table is what every kind of node records.
No seed may be used by two nodes, except where they share it on purpose: random_init and dBOT stage 0 (the stage-0
teacher is the student's own init), the chains of one dBOT stage (they differ only in their teacher), and one
protocol's seed across the encoders it evaluates (every encoder gets the same probe).
"""
import contextlib
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import copy_dag

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
                                             # the streams computed hold the real ones

PROTOCOLS = ("linprobe", "segprobe", "finetune", "robustness")
RUN_ON = "random_init"      # the encoder the tiny run's protocol nodes evaluate (every encoder gets the same probe)

_into: list[set] = []       # the sets of the recording() blocks open now: a seed goes to the innermost


@contextlib.contextmanager
def recording(seen: set):
    """Record every seed given to torch.manual_seed and torch.Generator.manual_seed inside the block into `seen`
    (inside another recording() block: into `seen` only, not the outer block's set)."""
    if _into:                                   # torch is patched already: only redirect
        _into.append(seen)
        try:
            yield seen
        finally:
            _into.pop()
        return
    manual, generator = torch.manual_seed, torch.Generator

    class Recorded(generator):
        def manual_seed(self, s):
            if _into:                           # (a generator made in a block may be seeded again after it)
                _into[-1].add(int(s))
            return super().manual_seed(s)

    def recorded_manual_seed(s):
        _into[-1].add(int(s))
        return manual(s)

    torch.manual_seed, torch.Generator = recorded_manual_seed, Recorded
    _into.append(seen)
    try:
        yield seen
    finally:
        _into.pop()
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


def node_streams(params: dict, method: str, key: str | None, images: int) -> set[int]:
    """The engine's stream seeds of a training node, on its own schedule (pretrain.settings)."""
    s = pretrain.settings(params, Namespace(method=method, stage=key))
    stage = layout.parse_dbot_key(key)[1] if key else 0
    return streams(config.node_seed(params, method, stage), s["epochs"], s["batch_size"], images)


def seed_table(params: dict, with_streams: bool = False, images: int | None = None) -> dict[str, set[int]]:
    """node id -> every seed it uses, for study seed params["seed"], computed (with_streams: and its engine
    streams, over `images` training images: by default every image of the source)."""
    s, images = params["seed"], images or IMAGES[params["data"]["dataset"]]
    table = {layout.node_id("random_init", s): {config.node_seed(params, "random_init")}}
    for method in layout.SINGLE_STAGE_METHODS + ("supervised",):
        table[layout.pretrain_node(method, s)] = built(params, method) | (
            node_streams(params, method, None, images) if with_streams else set())
    table[f"sdae teacher@seed{s}"] = sdae_teacher(params)
    stages = {k: built(params, "dbot", k) for k in layout.dbot_stages(params)}
    for key in layout.dbot_keys(params):
        table[layout.pretrain_node("dbot", s, key)] = stages[layout.parse_dbot_key(key)[1]] | (
            node_streams(params, "dbot", key, images) if with_streams else set())
    table[f"pictures@seed{s}"] = {config.node_seed(params, "pictures")}   # every training node's reconstruction.png
    linear = probed(params)
    noise = {robustness.noise_seed(config.node_seed(params, "robustness"), name, level)
             for name in params["robustness"]["corruptions"] for level in params["robustness"]["severities"]}
    tuned = {config.node_seed(params, "finetune")}
    if with_streams:
        f = params["finetune"]
        tuned |= streams(config.node_seed(params, "finetune"), f["epochs"], f["batch_size"], images,
                         finetune.seed_step)
    seeds = {"linprobe": linear, "segprobe": {config.node_seed(params, "segprobe")}, "finetune": tuned,
             "robustness": noise}
    return table | protocol_nodes(params, seeds)


def sdae_teacher(params: dict) -> set[int]:
    """The seeds of SdAE's random teacher (sdae.teacher_init random; not the presets' choice, so no run records it)."""
    return built(params, "sdae", teacher_init="random") - built(params, "sdae")


def protocol_nodes(params: dict, seeds: dict[str, set[int]]) -> dict[str, set[int]]:
    """Every protocol node of study seed params["seed"] -> its protocol's seeds (the same for every encoder)."""
    weights = {"linprobe": layout.probe_weights(params), "segprobe": layout.all_weights(params),
               "finetune": layout.finetune_weights(params), "robustness": layout.finetune_weights(params)}
    return {layout.node_id(protocol, params["seed"], w): seeds[protocol] for protocol in PROTOCOLS
            for w in weights[protocol]}


@dataclass
class TinyRun:
    params: dict                 # the tiny preset with seeds [0, 1]
    table: dict[str, set[int]]   # node id -> the seeds recorded while it ran (protocols: for every encoder)
    train_images: int            # the prepared train split: the images the engine's streams ran over


def tiny_nodes(params: dict, s: int) -> list[tuple[str | None, object, list[str]]]:
    """(node id, its CLI's main, its arguments) of every node of study seed s that the tiny run runs, in DAG order:
    random_init, the training nodes (teacher_swap, node id None, before each dBOT stage) and the protocols on
    random_init's encoder."""
    from pipeline.stages.evaluation import finetune as finetune_stage
    from pipeline.stages.evaluation import robustness as robustness_stage
    from pipeline.stages.evaluation import segprobe
    from pipeline.stages.training import random_init, teacher_swap

    runs = [(layout.node_id("random_init", s), random_init.main, [])]
    runs += [(layout.pretrain_node(m, s), pretrain.main, ["--method", m])
             for m in layout.SINGLE_STAGE_METHODS + ("supervised",)]
    for key in layout.dbot_keys(params):
        runs += [(None, teacher_swap.main, ["--stage", key]),
                 (layout.pretrain_node("dbot", s, key), pretrain.main, ["--method", "dbot", "--stage", key])]
    stages = {"linprobe": linprobe, "segprobe": segprobe, "finetune": finetune_stage, "robustness": robustness_stage}
    return runs + [(protocol, stages[protocol].main, ["--weights", RUN_ON]) for protocol in PROTOCOLS]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> TinyRun:
    """The tiny study's stochastic nodes, run in-process through their CLIs (stage_main: the params the node
    loads, its checks, its work) for study seeds 0 and 1 in a temp working dir; what each recorded. Left out: the
    drawing of the reconstruction pictures (matplotlib, which draws no seed and took half a training node's time;
    the masks are drawn, and recorded, before it)."""
    from pipeline.data import datasets
    from pipeline.reporting import figures
    from pipeline.stages.training import prepare_data

    root = copy_dag(tmp_path_factory.mktemp("seeds"))
    params = config.load("tiny", ["seeds=[0, 1]"])
    table, threads = {}, torch.get_num_threads()
    draw_picture = figures.reconstruction_grid
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.setattr(figures, "_draw", lambda rows, title, path: Path(path).write_bytes(b""))   # no seed: matplotlib
        torch.set_num_threads(1)    # the 2 cores are shared: one thread is faster here
        try:
            prepare_data.main(["--preset", "tiny"])
            for s in (0, 1):
                pictures = table.setdefault(f"pictures@seed{s}", set())

                def picture(*args, pictures=pictures, **kwargs):     # the picture's masks: a node of their own
                    with recording(pictures):
                        return draw_picture(*args, **kwargs)

                mp.setattr(figures, "reconstruction_grid", picture)
                seeds = {}
                for node, main, argv in tiny_nodes(params, s):
                    with recording(seeds.setdefault(node, set())):
                        main(["--preset", "tiny", "--set", "seeds=[0, 1]", "--seed", str(s), *argv])
                assert not seeds.pop(None), "teacher_swap seeded torch"      # it copies weights, draws nothing
                table.update({k: v for k, v in seeds.items() if k not in PROTOCOLS})
                with_seed = config.with_seed(params, s)
                table[f"sdae teacher@seed{s}"] = sdae_teacher(with_seed)
                table.update(protocol_nodes(with_seed, {p: seeds[p] for p in PROTOCOLS}))
            train_images = len(datasets.load_prepared().train_y)
        finally:
            torch.set_num_threads(threads)
    return TinyRun(params, table, train_images)


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
def test_no_two_nodes_share_a_seed_unless_on_purpose(preset, request):
    """Inits, masks, crops, drop paths and sample orders: every seed of every node, engine streams included
    (tiny: as the nodes ran; default: computed, test_the_recorded_seeds_are_the_computed_ones)."""
    params = config.load(preset, ["seeds=[0, 1]"])
    if preset == "tiny":
        table = request.getfixturevalue("tiny_run").table
    else:
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


def test_the_recorded_seeds_are_the_computed_ones(tiny_run):
    """On the tiny preset every node records exactly the seeds seed_table computes for it (its engine streams over
    the train split it ran on): the computed table of the default preset is the one its nodes would record."""
    for s in (0, 1):
        computed = seed_table(config.with_seed(tiny_run.params, s), True, tiny_run.train_images)
        recorded = {k: v for k, v in tiny_run.table.items() if k.split("@")[1].split("-")[0] == f"seed{s}"}
        assert recorded.keys() == computed.keys()
        wrong = {node: {"recorded only": sorted(recorded[node] - seeds)[:5],
                        "computed only": sorted(seeds - recorded[node])[:5]}
                 for node, seeds in computed.items() if recorded[node] != seeds}
        assert not wrong, wrong


@pytest.mark.parametrize("preset", ["default", "tiny"])
def test_the_seed_block_holds_every_offset(preset):
    """Each study seed's seeds stay inside its block of 1000, so two study seeds never meet."""
    params = config.load(preset, ["seeds=[0, 1]"])
    table = seed_table(config.with_seed(params, 1))
    assert all(1000 <= seed < 2000 for seeds in table.values() for seed in seeds), table
    with pytest.raises(Exception, match="at most 50 stages"):
        config.load("tiny",
                    ["dbot.stages={" + ", ".join(f"stage{k}: {{epochs: 1, blr: 1.0}}" for k in range(51)) + "}"])
