"""Where every node writes: one function per output, used by the stage CLIs, the Snakefile, dvc.yaml's
generator and the report.

All paths are relative to the working directory (the repository root, or a copy of it in tests).
The study runs once per seed (params seeds). prepare_data (one split for every seed) writes
results/prepare_data/ (dataset_path: the tensor file DATASET, or a streamed image folder's MANIFEST); the report
(across seeds) writes results/summary.*, results/swap_*.csv and
results/plots/; every other node writes results/seed<S>/<node>/<key>/. Resumable training state lives in
results/.resume/<node id>/, which no node declares as an output (Snakemake and DVC delete declared outputs
before a rerun).

Node ids, used as MLflow run names, DVC stage names and resume folders: "<node>@seed<S>-<key>", e.g.
pretrain@seed0-mae, pretrain_dbot@seed0-random_stage1, knn@seed1-dbot_mae_stage2; "<node>@seed<S>" for
nodes without a key (random_init, supervised, cka); "prepare_data" and "report".

Weights ids name every evaluable encoder of one seed: "random_init" (the random floor), "<method>" for
single-stage methods ("mae", "sdae", "rcmae", "bootmae"), "supervised", and "dbot_<chain>_stage<k>" for stage
k of the dBOT chain <chain> (params dbot.chains: the teacher-swap study). A dBOT node's key is
"<chain>_stage<k>": pretrain_dbot@seed0-random_stage1 writes results/seed0/pretrain_dbot/random_stage1/,
weights id dbot_random_stage1.

"pixels" is the second floor: a weights id of the knn and linprobe protocols only (probe_weights), whose
features are the normalised images themselves, so it has no weights file (weights_path gives the prepared
dataset it reads) and no other node (segprobe, finetune, analyze, cka) takes it: knn@seed0-pixels,
linprobe@seed0-pixels write results/seed0/{knn,linprobe}/pixels/metrics.json.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from pipeline import methods

RESULTS = Path("results")
DATA_DIR = RESULTS / "prepare_data"
DATASET = DATA_DIR / "dataset.safetensors"          # uint8 images + int64 labels; meta in dataset.json
MANIFEST = DATA_DIR / "manifest.jsonl"              # data.format stream: one line per image; meta in manifest.json
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
RESUME_DIR = RESULTS / ".resume"
IMPORTED_DIR = RESULTS / "imported"                 # import_weights: released checkpoints as encoder files
IMPORTED_PREFIX = "imported_"                       # weights id imported_<name>:
                                                    # IMPORTED_DIR/<name>/encoder.safetensors
SUMMARY_CSV = RESULTS / "summary.csv"
SUMMARY_MD = RESULTS / "summary.md"
CLAIMS_CSV = RESULTS / "claims.csv"                 # the report's claims, one row per comparison
                                                    # (pipeline.reporting.claims)
PLOTS_DIR = RESULTS / "plots"

SINGLE_STAGE_METHODS = methods.with_node("pretrain")   # mae, sdae, rcmae, bootmae: pre-trained by one `pretrain` node
TEACHER_SOURCES = ("random_init",) + SINGLE_STAGE_METHODS + ("supervised",)   # weights ids a dBOT chain may start from
PIXELS = "pixels"                  # the raw-pixel floor: knn and linprobe on the normalised images
FLOORS = ("random_init", PIXELS)   # weights ids no method trained: what every trained encoder should beat
DBOT_KEY = re.compile(r"^(?P<chain>[a-z0-9]+)_stage(?P<stage>\d+)$")


def sidecar(path: Path | str) -> Path:
    """The provenance JSON beside a weights or data file: x.safetensors -> x.json."""
    return Path(path).with_suffix(".json")


def is_image_name(name: str) -> bool:
    """A non-hidden file name with an image extension (what a streamed image folder reads; others are skipped)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


@functools.lru_cache(maxsize=8)
def count_images(root: str) -> int:
    """Image files (is_image_name) in the class folders of an image folder (root/<class>/, or root/train/<class>/
    and root/val/<class>/): one directory listing per class, no file opened."""
    tops = [os.path.join(root, s) for s in ("train", "val") if os.path.isdir(os.path.join(root, s))] or [root]
    classes = [e.path for top in tops for e in os.scandir(top) if e.is_dir() and not e.name.startswith(".")]
    return sum(1 for c in classes for e in os.scandir(c) if e.is_file() and is_image_name(e.name))


def data_format(data: dict) -> str:
    """The params data section's resolved format: tensor or stream (data.format; auto = stream when the uint8
    tensor of every image, N x channels x img_size^2 bytes, would exceed data.tensor_budget_gb). Only an image
    folder streams; auto counts its images (count_images), so its folder must exist."""
    if data["format"] != "auto" or data["dataset"] != "imagefolder":
        return "tensor" if data["dataset"] != "imagefolder" else data["format"]
    if not data["path"] or not os.path.isdir(data["path"]):
        from pipeline.errors import PipelineError
        raise PipelineError(f"data.format auto counts the images of data.path {data['path']}, which is not a folder; "
                            "set data.format to tensor or stream")
    nbytes = count_images(str(data["path"])) * data["channels"] * data["img_size"] ** 2
    return "stream" if nbytes > data["tensor_budget_gb"] * 2 ** 30 else "tensor"


def dataset_path(params: dict) -> Path:
    """What prepare_data writes and every other node reads: DATASET (tensor) or MANIFEST (stream)."""
    return MANIFEST if data_format(params["data"]) == "stream" else DATASET


def seed_dir(seed: int) -> Path:
    """results/seed<S>/: every output of one seed of the study."""
    return RESULTS / f"seed{seed}"


def node_id(node: str, seed: int, key: str | None = None) -> str:
    """'<node>@seed<S>-<key>' (or '<node>@seed<S>'): the name of one per-seed node everywhere."""
    return f"{node}@seed{seed}" + (f"-{key}" if key else "")


def dbot_key(chain: str, stage: int) -> str:
    """Key of a dBOT node: '<chain>_stage<k>'."""
    return f"{chain}_stage{stage}"


def parse_dbot_key(key: str) -> tuple[str, int]:
    """'<chain>_stage<k>' -> (chain, k); ValueError for anything else."""
    match = DBOT_KEY.match(key)
    if not match:
        raise ValueError(f"{key!r} is not a dBOT node key such as random_stage0")
    return match["chain"], int(match["stage"])


def dbot_weights(key: str) -> str:
    return f"dbot_{key}"


def pretrain_node(method: str, seed: int, key: str | None = None) -> str:
    """Node id of a training node: pretrain@seed<S>-<method>, pretrain_dbot@seed<S>-<key> or supervised@seed<S>."""
    if method == "dbot":
        return node_id("pretrain_dbot", seed, key)
    return node_id("supervised", seed) if method == "supervised" else node_id("pretrain", seed, method)


def pretrain_dir(method: str, seed: int, key: str | None = None) -> Path:
    """results/seed<S>/ + pretrain/<method>/, pretrain_dbot/<key>/ (dBOT) or supervised/."""
    if method == "dbot":
        return seed_dir(seed) / "pretrain_dbot" / key
    return seed_dir(seed) / ("supervised" if method == "supervised" else f"pretrain/{method}")


def teacher_path(key: str, seed: int) -> Path:
    return seed_dir(seed) / "teacher_swap" / key / "teacher.safetensors"


def optimizer_path(key: str, seed: int) -> Path:
    """dBOT node <key>'s final AdamW state (dbot.carry_optimizer_state):
    results/seed<S>/pretrain_dbot/<key>/optimizer.pt."""
    return pretrain_dir("dbot", seed, key) / "optimizer.pt"


def carried_optimizer(params: dict, key: str, seed: int) -> Path | None:
    """The optimizer state dBOT node <key> starts from: stage k-1's of the same chain when
    dbot.carry_optimizer_state is on and k > 0, else None."""
    chain, stage = parse_dbot_key(key)
    if not params["dbot"]["carry_optimizer_state"] or stage == 0:
        return None
    return optimizer_path(dbot_key(chain, stage - 1), seed)


def weights_path(weights: str, seed: int) -> Path:
    """Encoder weights file of a weights id of one seed; for the pixel floor, the prepared dataset (its features
    are the images); for imported_<name>, results/imported/<name>/ (any seed: import_weights wrote it)."""
    if weights == PIXELS:
        return DATASET
    if weights.startswith(IMPORTED_PREFIX):
        return IMPORTED_DIR / weights.removeprefix(IMPORTED_PREFIX) / "encoder.safetensors"
    if weights == "random_init":
        return seed_dir(seed) / "random_init" / "encoder.safetensors"
    if weights.startswith("dbot_"):
        return pretrain_dir("dbot", seed, weights.removeprefix("dbot_")) / "encoder.safetensors"
    return pretrain_dir(weights, seed) / "encoder.safetensors"


def teacher_source(params: dict, key: str, seed: int) -> str:
    """The file teacher_swap@seed<S>-<key> copies: for stage 0 the chain's dbot.chains entry (a weights id of
    the same seed, or a path), for stage k the student of stage k-1 of the same chain and seed."""
    chain, stage = parse_dbot_key(key)
    if stage > 0:
        return str(weights_path(dbot_weights(dbot_key(chain, stage - 1)), seed))
    source = params["dbot"]["chains"][chain]
    return str(weights_path(source, seed)) if source in TEACHER_SOURCES else source


KEEPS_CHECKPOINTS = SINGLE_STAGE_METHODS     # training nodes that keep their encoder every K epochs


def eval_metrics(protocol: str, weights: str, seed: int) -> Path:
    """results/seed<S>/<protocol>/<weights>/metrics.json: an evaluation node's result (pipeline.dag)."""
    return seed_dir(seed) / protocol / weights / "metrics.json"


def finetuned_path(weights: str, seed: int) -> Path:
    """The fine-tuned model (encoder + norm + head) of finetune@seed<S>-<weights>, read by robustness."""
    return seed_dir(seed) / "finetune" / weights / "model.safetensors"


def finetune_weights(params: dict) -> list[str]:
    """Weights ids the study fine-tunes: every one (finetune.weights = all), or the floor, every method and
    the last stage of each dBOT chain (final)."""
    if params["finetune"]["weights"] == "all":
        return all_weights(params)
    last = dbot_stages(params)[-1]
    return ["random_init", *SINGLE_STAGE_METHODS, "supervised"] + [
        dbot_weights(dbot_key(chain, last)) for chain in params["dbot"]["chains"]]


def kept_epochs(params: dict, weights: str) -> list[int]:
    """Epochs (1-based) after which the training node of `weights` keeps its encoder: every
    pretrain.keep_every_epochs of its own schedule (<method>.pretrain over pretrain: config.method_params), before
    its last epoch (the final encoder is encoder.safetensors). The single-stage methods keep the same epochs
    (config checks it: one rule declares their files)."""
    if weights not in KEEPS_CHECKPOINTS:
        return []
    own = methods.own_pretrain(params, weights)

    def setting(key):
        return own[key] if key in own else params["pretrain"][key]

    every = setting("keep_every_epochs")
    return list(range(every, setting("epochs"), every)) if every else []


def checkpoint_path(weights: str, seed: int, epoch: int) -> Path:
    """An intermediate encoder: <training node dir>/checkpoints/epoch<k>.safetensors."""
    return weights_path(weights, seed).parent / "checkpoints" / f"epoch{epoch}.safetensors"


def checkpoint_eval_inputs(params: dict, weights: str, seed: int) -> list[Path]:
    """What checkpoint_eval@seed<S>-<weights> reads: the kept encoders, the final encoder's knn and linprobe
    metrics, and the training node's metrics.json (its online k-NN curve)."""
    kept = [checkpoint_path(weights, seed, e) for e in kept_epochs(params, weights)]
    finals = [eval_metrics(p, weights, seed) for p in ("knn", "linprobe")]
    return [dataset_path(params), *kept, *finals, weights_path(weights, seed).parent / "metrics.json"]


def checkpoint_eval_weights(params: dict) -> list[str]:
    """Weights ids whose training node keeps intermediate encoders (none if pretrain.keep_every_epochs is null,
    and none on a streamed dataset: see IN_MEMORY_NODES)."""
    if streamed(params):
        return []
    return [w for w in KEEPS_CHECKPOINTS if kept_epochs(params, w)]


# nodes that read every image of a split into memory: not in the DAG of a streamed dataset (data.format stream)
IN_MEMORY_NODES = ("segprobe", "robustness", "analyze", "cka", "checkpoint_eval")


def streamed(params: dict) -> bool:
    """Whether the study reads its images streamed (data.format stream, or auto past the tensor budget)."""
    return data_format(params["data"]) == "stream"


def analysis_weights(params: dict) -> list[str]:
    """Weights ids that analyze runs on (first seed only): every encoder, none on a streamed dataset."""
    return [] if streamed(params) else all_weights(params)


def cka_seeds(params: dict) -> list[int]:
    """Seeds that cka runs for: every seed, none on a streamed dataset."""
    return [] if streamed(params) else list(params["seeds"])


def report_plots(params: dict) -> list[str]:
    """Names of the report's plots (results/plots/<name>.png): the analyses' only with analyses, the
    checkpoint curves only with checkpoint_eval nodes."""
    names = ["pretrain_loss", "online_knn", "protocols", "chain_accuracy", "accuracy_vs_compute"]
    names += ["attention_distance", "singular_value_share"] if analysis_weights(params) else []
    return names + ["swap_study"] + (["checkpoint_eval"] if checkpoint_eval_weights(params) else [])


def analysis_path(weights: str, seed: int) -> Path:
    """results/seed<S>/analyze/<weights>/analysis.json."""
    return seed_dir(seed) / "analyze" / weights / "analysis.json"


def cka_path(seed: int) -> Path:
    return seed_dir(seed) / "cka" / "cka.json"


def dbot_stages(params: dict) -> list[int]:
    """Stage indices of every dBOT chain, from params dbot.stages (keys stage0, stage1, ...)."""
    return [int(k.removeprefix("stage")) for k in params["dbot"]["stages"]]


def dbot_keys(params: dict) -> list[str]:
    """Every dBOT node key, chain by chain (in dbot.chains order), stages ascending."""
    return [dbot_key(chain, k) for chain in params["dbot"]["chains"] for k in dbot_stages(params)]


def all_weights(params: dict) -> list[str]:
    """Every weights id one seed of the study evaluates: the random floor, single-stage methods, supervised,
    dBOT stages."""
    ids = ["random_init"] + [m for m in SINGLE_STAGE_METHODS] + ["supervised"]
    return ids + [dbot_weights(key) for key in dbot_keys(params)]


def probe_weights(params: dict) -> list[str]:
    """Weights ids of the knn and linprobe nodes: every encoder (all_weights), then the pixel floor (not for a
    streamed dataset: its flattened pixels would not fit in memory, e.g. 770 GB for ImageNet at 224)."""
    return all_weights(params) + ([] if streamed(params) else [PIXELS])


def pretrain_metrics(params: dict, seed: int) -> list[Path]:
    """metrics.json of every pre-training node of one seed."""
    paths = [pretrain_dir(m, seed) / "metrics.json" for m in SINGLE_STAGE_METHODS + ("supervised",)]
    return paths + [pretrain_dir("dbot", seed, key) / "metrics.json" for key in dbot_keys(params)]


def resume_dir(node: str) -> Path:
    """Resumable state of a node (by node id), e.g. results/.resume/pretrain_dbot@seed0-random_stage1/."""
    return RESUME_DIR / node


def describe_weights(weights: str) -> dict:
    """weights id -> {"id", "method", "stage", "chain"}: the MLflow chain a weights id belongs to."""
    if weights == "random_init":
        return {"id": weights, "method": "random", "stage": None, "chain": "random_init"}
    if weights == PIXELS:
        return {"id": weights, "method": PIXELS, "stage": None, "chain": PIXELS}
    if weights.startswith("dbot_"):
        chain, stage = parse_dbot_key(weights.removeprefix("dbot_"))
        return {"id": weights, "method": "dbot", "stage": stage, "chain": f"dbot_{chain}"}
    if weights.startswith(IMPORTED_PREFIX):
        return {"id": weights, "method": "imported", "stage": None, "chain": weights}
    return {"id": weights, "method": weights, "stage": 0, "chain": weights}
