"""linprobe: linear-probe accuracy of a frozen encoder -> results/seed<S>/linprobe/<weights>/metrics.json.

MAE's protocol on frozen features (encoder in eval mode, computed once, no augmentation): a BatchNorm
without affine parameters (linprobe.head: bn) followed by a linear layer, trained for linprobe.epochs with
linprobe.optimizer (sgd | lars | adamw) + cosine lr; top-1/top-5 on the val split after the last epoch,
with the per-epoch curve in "history". The settings are recorded beside the metric in metrics.json.
--weights pixels: the raw-pixel floor (the same protocol on the normalised images, flattened).
Tiny run: python -m pipeline.stages.evaluation.linprobe --preset tiny --weights mae
"""
from pipeline import layout
from pipeline.config import node_seed
from pipeline.orchestration.cli import stage_main
from pipeline.stages.evaluation.common import add_args, check_probe, evaluate


def protocol(params, train_f, train_y, val_f, val_y, num_classes):
    from pipeline.evaluation.probes import linear_probe

    s = params["linprobe"]
    return linear_probe(train_f, train_y, val_f, val_y, num_classes, s["epochs"], s["batch_size"], s["lr"],
                        s["momentum"], s["weight_decay"], node_seed(params, "linprobe"), s["head"], s["optimizer"])


def work(params: dict, args) -> None:
    evaluate(params, args, "linprobe", protocol)


def main(argv=None) -> None:
    stage_main("linprobe", __doc__, add_args, check_probe, work,
               lambda a: layout.node_id("linprobe", a.seed, a.weights), argv)


if __name__ == "__main__":
    main()
