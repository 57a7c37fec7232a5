"""Shared body of the evaluation nodes (knn, linprobe): load data and weights, extract frozen features,
run the protocol, write results/<protocol>/<weights>/metrics.json, log the child run. Its checks, weights
record and tracked run are shared with finetune and robustness."""
from __future__ import annotations

from typing import Callable

from pipeline import data, hardware, layout
from pipeline.checkpoint import write_json
from pipeline.encoder import load_encoder
from pipeline.errors import PipelineError
from pipeline.evaluation import extract_features
from pipeline.node import tracked


def add_args(parser) -> None:
    parser.add_argument("--weights", required=True,
                        help="weights id: random_init, mae, ..., dbot_<chain>_stage<k> (see pipeline/layout.py)")


def check_weights_id(params: dict, args) -> None:
    known = layout.all_weights(params)
    if args.weights not in known:
        raise PipelineError(f"unknown weights {args.weights!r}; this study has {', '.join(known)}")


def require(*paths, hint: str = "run the node that makes it first") -> None:
    for path in paths:
        if not path.is_file():
            raise PipelineError(f"missing input {path}: {hint}")


def check(params: dict, args) -> None:
    check_weights_id(params, args)
    require(layout.DATASET, layout.weights_path(args.weights, args.seed))


def weights_record(args, meta: dict, depth: int, path) -> dict:
    """The "weights" entry of an evaluation's metrics.json: which encoder of which seed, and its file."""
    info = layout.describe_weights(args.weights)
    return {"id": args.weights, "method": info["method"], "stage": info["stage"], "seed": args.seed,
            "evaluated": "random" if info["method"] == "random" else meta.get("evaluated", "student"),
            "depth": depth,          # blocks evaluated (bootmae.probe_block may cut them)
            "path": str(path), "sha256": meta.get("sha256")}


def eval_run(params: dict, args, protocol: str, weights: dict, sections: list[str], amp: hardware.Precision):
    """The evaluation's tracked MLflow child run (in the weights' chain), its params written beside `out`; its
    tags include the precision it runs in and why."""
    out = layout.eval_metrics(protocol, args.weights, args.seed)
    return tracked(params, layout.describe_weights(args.weights)["chain"], layout.node_id(protocol, args.seed, args.weights),
                   out.parent, sections, {"weights": args.weights, "evaluated": weights["evaluated"],
                                          "protocol": protocol, "weights_sha256": weights["sha256"], **amp.record()})


def log_history(run, history: list[dict]) -> None:
    for h in history:
        run.log_metrics({k: v for k, v in h.items() if k != "epoch"}, step=h["epoch"])


def print_metrics(protocol: str, args, metrics: dict) -> None:
    print(f"{layout.node_id(protocol, args.seed, args.weights)}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.items()))


def evaluate(params: dict, args, protocol: str, protocol_fn: Callable) -> dict:
    """protocol_fn(params, train_f, train_y, val_f, val_y, num_classes) -> (metrics, history)."""
    settings = params[protocol]
    prep = data.load_prepared()
    path = layout.weights_path(args.weights, args.seed)
    encoder, meta = load_encoder(path, params, prep.train_x.shape[1], prep.train_x.shape[-1])
    device = hardware.device(params["launch"]["device"])
    encoder.to(device)
    amp = hardware.resolve(settings["precision"], device)
    weights = weights_record(args, meta, encoder.config["depth"], path)
    out = layout.eval_metrics(protocol, args.weights, args.seed)
    with eval_run(params, args, protocol, weights, ["seed", protocol], amp) as run:
        kind = settings["feature"]
        train_f = extract_features(encoder, prep.train_x, prep.mean, prep.std, kind, amp.name, desc=f"{protocol} train")
        val_f = extract_features(encoder, prep.val_x, prep.mean, prep.std, kind, amp.name, desc=f"{protocol} val")
        metrics, history = protocol_fn(params, train_f, prep.train_y, val_f, prep.val_y, len(prep.class_names))
        result = {"protocol": protocol, "settings": settings, "weights": weights, "metrics": metrics, **amp.record()}
        if history:
            result["history"] = history
            log_history(run, history)
        write_json(out, result)
        run.log_metrics(metrics)
        run.log_artifacts(out)
    print_metrics(protocol, args, metrics)
    return result
