"""Where every node writes: one function per output, used by the stage CLIs, the Snakefile and the report.

All paths are relative to the working directory (the repository root, or a copy of it in tests).
A node's outputs live in results/<node>/<key>/; resumable training state lives in results/.resume/,
which no node declares as an output (Snakemake and DVC delete declared outputs before a rerun).

Weights ids name every evaluable encoder: "random_init" (the random floor), "<method>" for single-stage
methods ("mae", "sdae", "rcmae", "bootmae"), "supervised", and "dbot_<chain>_stage<k>" for stage k of the
dBOT chain <chain> (params dbot.chains: the teacher-swap study). A dBOT node's key is "<chain>_stage<k>":
pretrain_dbot@random_stage1 writes results/pretrain_dbot/random_stage1/, weights id dbot_random_stage1.
"""
from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path("results")
DATA_DIR = RESULTS / "prepare_data"
DATASET = DATA_DIR / "dataset.safetensors"          # uint8 images + int64 labels; meta in dataset.json
RANDOM_INIT_DIR = RESULTS / "random_init"
RESUME_DIR = RESULTS / ".resume"
SUMMARY_CSV = RESULTS / "summary.csv"
SUMMARY_MD = RESULTS / "summary.md"
PLOTS_DIR = RESULTS / "plots"

SINGLE_STAGE_METHODS = ("mae", "sdae", "rcmae", "bootmae")   # methods whose pre-training is one `pretrain` node
TEACHER_SOURCES = ("random_init",) + SINGLE_STAGE_METHODS + ("supervised",)   # weights ids a dBOT chain may start from
DBOT_KEY = re.compile(r"^(?P<chain>[a-z0-9]+)_stage(?P<stage>\d+)$")


def sidecar(path: Path | str) -> Path:
    """The provenance JSON beside a weights or data file: x.safetensors -> x.json."""
    return Path(path).with_suffix(".json")


def dbot_key(chain: str, stage: int) -> str:
    """Key of a dBOT node: '<chain>_stage<k>' (the Snakemake wildcard, the DVC foreach key, the folder)."""
    return f"{chain}_stage{stage}"


def parse_dbot_key(key: str) -> tuple[str, int]:
    """'<chain>_stage<k>' -> (chain, k); ValueError for anything else."""
    match = DBOT_KEY.match(key)
    if not match:
        raise ValueError(f"{key!r} is not a dBOT node key such as random_stage0")
    return match["chain"], int(match["stage"])


def dbot_weights(key: str) -> str:
    return f"dbot_{key}"


def pretrain_node(method: str, key: str | None = None) -> str:
    """Node id of a training node: pretrain@<method>, pretrain_dbot@<chain>_stage<k>, or supervised."""
    if method == "dbot":
        return f"pretrain_dbot@{key}"
    return "supervised" if method == "supervised" else f"pretrain@{method}"


def pretrain_dir(method: str, key: str | None = None) -> Path:
    """results/pretrain/<method>/, results/pretrain_dbot/<chain>_stage<k>/ (dBOT) or results/supervised/."""
    if method == "dbot":
        return RESULTS / "pretrain_dbot" / key
    return RESULTS / "supervised" if method == "supervised" else RESULTS / "pretrain" / method


def teacher_path(key: str) -> Path:
    return RESULTS / "teacher_swap" / key / "teacher.safetensors"


def weights_path(weights: str) -> Path:
    """Encoder weights file of a weights id."""
    if weights == "random_init":
        return RANDOM_INIT_DIR / "encoder.safetensors"
    if weights.startswith("dbot_"):
        return pretrain_dir("dbot", weights.removeprefix("dbot_")) / "encoder.safetensors"
    return pretrain_dir(weights) / "encoder.safetensors"


def teacher_source(params: dict, key: str) -> str:
    """The file teacher_swap@<key> copies: for stage 0 the chain's dbot.chains entry (a weights id of the study,
    or a path), for stage k the student of stage k-1 of the same chain."""
    chain, stage = parse_dbot_key(key)
    if stage > 0:
        return str(weights_path(dbot_weights(dbot_key(chain, stage - 1))))
    source = params["dbot"]["chains"][chain]
    return str(weights_path(source)) if source in TEACHER_SOURCES else source


def eval_metrics(protocol: str, weights: str) -> Path:
    """results/<protocol>/<weights>/metrics.json for protocol in (knn, linprobe)."""
    return RESULTS / protocol / weights / "metrics.json"


def analysis_path(weights: str) -> Path:
    """results/analyze/<weights>/analysis.json."""
    return RESULTS / "analyze" / weights / "analysis.json"


def dbot_stages(params: dict) -> list[int]:
    """Stage indices of every dBOT chain, from params dbot.stages (keys stage0, stage1, ...)."""
    return [int(k.removeprefix("stage")) for k in params["dbot"]["stages"]]


def dbot_keys(params: dict) -> list[str]:
    """Every dBOT node key, chain by chain (in dbot.chains order), stages ascending."""
    return [dbot_key(chain, k) for chain in params["dbot"]["chains"] for k in dbot_stages(params)]


def all_weights(params: dict) -> list[str]:
    """Every weights id the study evaluates: the random floor, single-stage methods, supervised, dBOT stages."""
    ids = ["random_init"] + [m for m in SINGLE_STAGE_METHODS] + ["supervised"]
    return ids + [dbot_weights(key) for key in dbot_keys(params)]


def pretrain_metrics(params: dict) -> list[Path]:
    """metrics.json of every pre-training node of the study."""
    paths = [pretrain_dir(m) / "metrics.json" for m in SINGLE_STAGE_METHODS + ("supervised",)]
    return paths + [pretrain_dir("dbot", key) / "metrics.json" for key in dbot_keys(params)]


def resume_dir(node_id: str) -> Path:
    """Resumable state of a node, e.g. results/.resume/pretrain_dbot@random_stage1/."""
    return RESUME_DIR / node_id


def describe_weights(weights: str) -> dict:
    """weights id -> {"id", "method", "stage", "chain"}: the MLflow chain a weights id belongs to."""
    if weights == "random_init":
        return {"id": weights, "method": "random", "stage": None, "chain": "random_init"}
    if weights.startswith("dbot_"):
        chain, stage = parse_dbot_key(weights.removeprefix("dbot_"))
        return {"id": weights, "method": "dbot", "stage": stage, "chain": f"dbot_{chain}"}
    return {"id": weights, "method": weights, "stage": 0, "chain": weights}
