"""Where every node writes: one function per output, used by the stage CLIs, the Snakefile and the report.

All paths are relative to the working directory (the repository root, or a copy of it in tests).
A node's outputs live in results/<node>/<key>/; resumable training state lives in results/.resume/,
which no node declares as an output (Snakemake and DVC delete declared outputs before a rerun).

Weights ids name every evaluable encoder: "random_init" (the random floor), "<method>" for single-stage
methods ("mae", "sdae", "rcmae", "bootmae"), and "dbot_stage<k>" for the stages of the dBOT chain.
"""
from __future__ import annotations

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


def sidecar(path: Path | str) -> Path:
    """The provenance JSON beside a weights or data file: x.safetensors -> x.json."""
    return Path(path).with_suffix(".json")


def pretrain_node(method: str, stage: int = 0) -> str:
    """Node id of a training node: pretrain@<method>, pretrain_dbot@stage<k>, or supervised."""
    if method == "dbot":
        return f"pretrain_dbot@stage{stage}"
    return "supervised" if method == "supervised" else f"pretrain@{method}"


def pretrain_dir(method: str, stage: int | None = None) -> Path:
    """results/pretrain/<method>/, results/pretrain_dbot/stage<k>/ (dBOT) or results/supervised/."""
    if method == "dbot":
        return RESULTS / "pretrain_dbot" / f"stage{stage}"
    return RESULTS / "supervised" if method == "supervised" else RESULTS / "pretrain" / method


def teacher_path(stage: int) -> Path:
    return RESULTS / "teacher_swap" / f"stage{stage}" / "teacher.safetensors"


def weights_path(weights: str) -> Path:
    """Encoder weights file of a weights id."""
    if weights == "random_init":
        return RANDOM_INIT_DIR / "encoder.safetensors"
    if weights.startswith("dbot_stage"):
        return pretrain_dir("dbot", int(weights.removeprefix("dbot_stage"))) / "encoder.safetensors"
    return pretrain_dir(weights) / "encoder.safetensors"


def eval_metrics(protocol: str, weights: str) -> Path:
    """results/<protocol>/<weights>/metrics.json for protocol in (knn, linprobe)."""
    return RESULTS / protocol / weights / "metrics.json"


def analysis_path(weights: str) -> Path:
    """results/analyze/<weights>/analysis.json."""
    return RESULTS / "analyze" / weights / "analysis.json"


def dbot_stages(params: dict) -> list[int]:
    """Stage indices of the dBOT chain, from params dbot.stages (keys stage0, stage1, ...)."""
    return [int(k.removeprefix("stage")) for k in params["dbot"]["stages"]]


def all_weights(params: dict) -> list[str]:
    """Every weights id the study evaluates: the random floor, single-stage methods, supervised, dBOT stages."""
    ids = ["random_init"] + [m for m in SINGLE_STAGE_METHODS] + ["supervised"]
    return ids + [f"dbot_stage{k}" for k in dbot_stages(params)]


def pretrain_metrics(params: dict) -> list[Path]:
    """metrics.json of every pre-training node of the study."""
    paths = [pretrain_dir(m) / "metrics.json" for m in SINGLE_STAGE_METHODS + ("supervised",)]
    return paths + [pretrain_dir("dbot", k) / "metrics.json" for k in dbot_stages(params)]


def resume_dir(node_id: str) -> Path:
    """Resumable state of a node, e.g. results/.resume/pretrain_dbot@stage1/."""
    return RESUME_DIR / node_id


def describe_weights(weights: str) -> dict:
    """weights id -> {"id", "method", "stage", "chain"}: the MLflow chain a weights id belongs to."""
    if weights == "random_init":
        return {"id": weights, "method": "random", "stage": None, "chain": "random_init"}
    if weights.startswith("dbot_stage"):
        return {"id": weights, "method": "dbot", "stage": int(weights.removeprefix("dbot_stage")), "chain": "dbot"}
    return {"id": weights, "method": weights, "stage": 0, "chain": weights}
