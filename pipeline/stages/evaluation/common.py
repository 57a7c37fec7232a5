"""What the evaluation nodes share (not a node: pipeline/dag.py lists those). The body of knn and linprobe: load
data and weights, extract frozen features, run the protocol, write results/<protocol>/<weights>/metrics.json, log
the child run. Its checks, weights record and tracked run are shared with finetune and robustness.

knn and linprobe also take --weights pixels (layout.PIXELS), the raw-pixel floor: the same protocol, split
and settings on the normalised images, flattened (evaluation.pixel_features), instead of an encoder's output."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline import layout
from pipeline.checkpoint import read_json, write_json
from pipeline.errors import PipelineError
from pipeline.orchestration.tracking import tracked

if TYPE_CHECKING:
    from pipeline.hardware import Precision


def add_args(parser) -> None:
    parser.add_argument("--weights", required=True,
                        help="weights id: random_init, mae, ..., dbot_<chain>_stage<k>, imported_<name> (an "
                             "import_weights output); knn and linprobe also pixels (see pipeline/layout.py)")


def check_weights_id(params: dict, args, known: list[str] | None = None) -> None:
    """A weights id of the study, or imported_<name> (an encoder file import_weights wrote)."""
    known = known or layout.all_weights(params)
    if args.weights.startswith(layout.IMPORTED_PREFIX):
        if not layout.weights_path(args.weights, args.seed).is_file():
            raise PipelineError(f"no imported encoder {layout.weights_path(args.weights, args.seed)}; write it with "
                                "python -m pipeline.stages.training.import_weights FILE --format ...")
    elif args.weights not in known:
        raise PipelineError(f"unknown weights {args.weights!r}; this study has {', '.join(known)}, or "
                            f"{layout.IMPORTED_PREFIX}<name> for an encoder in {layout.IMPORTED_DIR}/<name>/")


def require(*paths, hint: str = "run the node that makes it first") -> None:
    for path in paths:
        if not path.is_file():
            raise PipelineError(f"missing input {path}: {hint}")


def check(params: dict, args) -> None:
    check_weights_id(params, args)
    require(layout.dataset_path(params), layout.weights_path(args.weights, args.seed))


def require_tensor(params: dict, node: str) -> None:
    """Nodes that read the prepared images as one tensor (segprobe, robustness, cka, analyze, checkpoint_eval)."""
    if layout.data_format(params["data"]) == "stream":
        raise PipelineError(f"{node} needs data.format tensor (it does not read a streamed image folder)")


def check_probe(params: dict, args) -> None:
    """knn and linprobe: an encoder of the study (as check), or the pixel floor, which reads only the dataset."""
    check_weights_id(params, args, layout.probe_weights(params))
    require(layout.dataset_path(params), layout.weights_path(args.weights, args.seed))


def weights_record(args, meta: dict, depth: int, path) -> dict:
    """The "weights" entry of an evaluation's metrics.json: which encoder of which seed, and its file (for the
    pixel floor: evaluated "pixels", depth 0, the prepared dataset)."""
    info = layout.describe_weights(args.weights)
    floor = info["method"] in ("random", layout.PIXELS)
    return {"id": args.weights, "method": info["method"], "stage": info["stage"], "seed": args.seed,
            "evaluated": info["method"] if floor else meta.get("evaluated", "student"),
            "depth": depth,          # blocks evaluated (bootmae.probe_block may cut them)
            "path": str(path), "sha256": meta.get("sha256")}


def eval_run(params: dict, args, protocol: str, weights: dict, sections: list[str], amp: Precision):
    """The evaluation's tracked MLflow child run (in the weights' chain), its params written beside `out`; its
    tags include the precision it runs in and why."""
    out = layout.eval_metrics(protocol, args.weights, args.seed)
    return tracked(params, layout.describe_weights(args.weights)["chain"],
                   layout.node_id(protocol, args.seed, args.weights),
                   out.parent, sections, {"weights": args.weights, "evaluated": weights["evaluated"],
                                          "protocol": protocol, "weights_sha256": weights["sha256"], **amp.record()})


def log_history(run, history: list[dict]) -> None:
    for h in history:
        run.log_metrics({k: v for k, v in h.items() if k != "epoch"}, step=h["epoch"])


def log_on_chain(run, protocol: str, weights: str, metrics: dict) -> None:
    """The protocol's metrics (knn_top1, linprobe_top5, ...) on the chain's parent run, at step = the weights'
    stage (a dBOT stage's index; 0 for a single-stage method and the floors): the parent's chart follows the
    bootstrap chain stage by stage."""
    stage = layout.describe_weights(weights)["stage"]
    run.log_chain_metrics({f"{protocol}_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                          step=stage or 0)


def print_metrics(protocol: str, args, metrics: dict) -> None:
    print(f"{layout.node_id(protocol, args.seed, args.weights)}: "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.items()))


def feature_source(params: dict, args, protocol: str, prep) -> tuple[Callable, dict, Precision]:
    """(features(images, split) -> (N, D) float32, the weights record, the precision) of --weights: an encoder's
    frozen features, or for the pixel floor the normalised pixels (fp32: no encoder runs)."""
    from pipeline import hardware
    from pipeline.evaluation.probes import extract_features, pixel_features
    from pipeline.models.encoder import load_encoder

    settings = params[protocol]
    path = layout.weights_path(args.weights, args.seed)
    if args.weights == layout.PIXELS:
        amp = hardware.Precision("fp32", settings["precision"], "raw pixels: the features are the normalised "
                                 "images, no encoder runs")
        weights = weights_record(args, {"sha256": read_json(layout.sidecar(path)).get("sha256")}, 0, path)
        return lambda images, split: pixel_features(images, prep.mean, prep.std), weights, amp
    encoder, meta = load_encoder(path, params["model"], prep.train_x.shape[1], prep.train_x.shape[-1])
    device = hardware.device(params["launch"]["device"])
    encoder.to(device)
    amp = hardware.resolve(settings["precision"], device)
    weights = weights_record(args, meta, encoder.config["depth"], path)
    return (lambda images, split: extract_features(encoder, images, prep.mean, prep.std, settings["feature"], amp.name,
                                                   desc=f"{protocol} {split}")), weights, amp


def evaluate(params: dict, args, protocol: str, protocol_fn: Callable) -> dict:
    """protocol_fn(params, train_f, train_y, val_f, val_y, num_classes) -> (metrics, history)."""
    from pipeline.data import datasets
    from pipeline.data.stream import bad_record, log_bad_images
    from pipeline.settings import stream

    settings = params[protocol]
    prep = datasets.load_dataset(stream(params))  # data.format stream: decoded with the eval transform
    features, weights, amp = feature_source(params, args, protocol, prep)
    out = layout.eval_metrics(protocol, args.weights, args.seed)
    with eval_run(params, args, protocol, weights, ["seed", protocol], amp) as run:
        train_f, val_f = features(prep.train_x, "train"), features(prep.val_x, "val")
        metrics, history = protocol_fn(params, train_f, prep.train_y, val_f, prep.val_y, len(prep.class_names))
        result = {"protocol": protocol, "settings": settings, "weights": weights, "metrics": metrics, **amp.record(),
                  **bad_record()}
        if history:
            result["history"] = history
            log_history(run, history)
        write_json(out, result)
        run.log_metrics(metrics)
        log_bad_images(run, bad_record())
        log_on_chain(run, protocol, args.weights, metrics)
        run.log_artifacts(out)
    print_metrics(protocol, args, metrics)
    return result
