"""checkpoint_eval: k-NN and linear probe of the encoders a training node kept along the way ->
results/seed<S>/checkpoint_eval/<weights>/{metrics.json,curve.png}.

The training nodes of single-stage methods keep their encoder every
pretrain.keep_every_epochs (checkpoints/epoch<k>.safetensors beside encoder.safetensors). This node runs
the knn and linprobe protocols (their params, unchanged) on each kept encoder, takes the final encoder's
numbers from knn@ and linprobe@ of the same weights, and draws top-1 against epochs next to the online
k-NN curve the training node logged (pretrain.online_knn: a subset, so lower and noisier).
Tiny run: python -m pipeline.stages.evaluation.checkpoint_eval --preset tiny --weights mae
"""
from __future__ import annotations

from pipeline import layout
from pipeline.checkpoint import read_json, write_json
from pipeline.errors import PipelineError
from pipeline.orchestration.cli import stage_main
from pipeline.orchestration.tracking import tracked
from pipeline.stages.evaluation import knn, linprobe
from pipeline.stages.evaluation.common import require_tensor

PROTOCOLS = {"knn": knn.protocol, "linprobe": linprobe.protocol}


def add_args(parser) -> None:
    parser.add_argument("--weights", required=True, help=f"one of {', '.join(layout.KEEPS_CHECKPOINTS)}")


def check(params: dict, args) -> None:
    require_tensor(params, "checkpoint_eval")
    if args.weights not in layout.KEEPS_CHECKPOINTS:
        raise PipelineError(f"checkpoint_eval --weights {args.weights}: only {', '.join(layout.KEEPS_CHECKPOINTS)} "
                            "keep intermediate encoders")
    if not layout.kept_epochs(params, args.weights):
        raise PipelineError(f"{args.weights} keeps no intermediate encoders (pretrain.keep_every_epochs is "
                            f"{params['pretrain']['keep_every_epochs']}); nothing to evaluate")
    for path in layout.checkpoint_eval_inputs(params, args.weights, args.seed):
        if not path.is_file():
            raise PipelineError(f"missing input {path}: run the node that makes it first")


def work(params: dict, args) -> None:
    from pipeline import hardware, plots
    from pipeline.data import datasets
    from pipeline.evaluation.probes import extract_features
    from pipeline.models.encoder import load_encoder

    prep = datasets.load_prepared()
    out = layout.eval_metrics("checkpoint_eval", args.weights, args.seed)
    info = layout.describe_weights(args.weights)
    training = read_json(layout.weights_path(args.weights, args.seed).parent / "metrics.json")
    total = len(training["epochs"])
    finals = {name: read_json(layout.eval_metrics(name, args.weights, args.seed))["metrics"]["top1"]
              for name in PROTOCOLS}
    kept = {epoch: load_encoder(layout.checkpoint_path(args.weights, args.seed, epoch), params["model"],  # every kept
                                prep.train_x.shape[1], prep.train_x.shape[-1])        # encoder verified before
            for epoch in layout.kept_epochs(params, args.weights)}                    # anything is written
    rows, device = [], hardware.device(params["launch"]["device"])
    amps = {name: hardware.resolve(params[name]["precision"], device) for name in PROTOCOLS}
    record = {f"{name}.{k}": v for name, amp in amps.items() for k, v in amp.record().items()}
    with tracked(params, info["chain"], node(args), out.parent, ["seed", "knn", "linprobe"],
                 {"weights": args.weights, "protocol": "checkpoint_eval", **record}) as run:
        for epoch, (encoder, meta) in kept.items():
            encoder.to(device)
            row = {"epoch": epoch, "sha256": meta.get("sha256")}
            for name, protocol in PROTOCOLS.items():
                s = params[name]
                feats = [extract_features(encoder, x, prep.mean, prep.std, s["feature"], amps[name].name,
                                          desc=f"{name} epoch {epoch}")
                         for x in (prep.train_x, prep.val_x)]
                metrics, _ = protocol(params, feats[0], prep.train_y, feats[1], prep.val_y, len(prep.class_names))
                row[f"{name}_top1"] = metrics["top1"]
            rows.append(row)
            run.log_metrics({k: v for k, v in row.items() if k.endswith("top1")}, step=epoch)
        final = {"epoch": total, "sha256": None, **{f"{name}_top1": top1 for name, top1 in finals.items()}}
        rows.append(final)
        run.log_metrics({k: v for k, v in final.items() if k.endswith("top1")}, step=total)
        online = [{"epoch": e["epoch"] + 1, "online_knn_top1": e["online_knn_top1"]}
                  for e in training["epochs"] if "online_knn_top1" in e]
        write_json(out, {"protocol": "checkpoint_eval", "settings": {n: params[n] for n in PROTOCOLS},
                         "weights": {"id": args.weights, "method": info["method"], "seed": args.seed},
                         "epochs": rows, "online_knn": online,
                         "precision": {name: amp.record() for name, amp in amps.items()}})
        plots.checkpoint_curve(args.weights, rows, online, out.parent / "curve.png")
        run.log_artifacts(out, out.parent / "curve.png")
    print(f"{node(args)}: " + "; ".join(f"epoch {r['epoch']}: k-NN {100 * r['knn_top1']:.1f}%, "
                                        f"linear {100 * r['linprobe_top1']:.1f}%" for r in rows))


def node(args) -> str:
    return layout.node_id("checkpoint_eval", args.seed, args.weights)


def main(argv=None) -> None:
    stage_main("checkpoint_eval", __doc__, add_args, check, work, node, argv)


if __name__ == "__main__":
    main()
