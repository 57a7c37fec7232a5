"""knn: weighted k-NN accuracy of a frozen encoder -> results/seed<S>/knn/<weights>/metrics.json.

Cosine similarity between val and train features, the k nearest (k=20) vote with weight exp(sim / T)
(T=0.07), as DINO's protocol. Features: knn.feature (cls token after the final norm, or mean of patches).
--weights pixels: the raw-pixel floor (the same protocol on the normalised images, flattened).
Tiny run: python -m pipeline.stages.evaluation.knn --preset tiny --weights mae
"""
from pipeline import layout
from pipeline.orchestration.cli import stage_main
from pipeline.stages.evaluation.common import add_args, check_probe, evaluate


def protocol(params, train_f, train_y, val_f, val_y, num_classes):
    from pipeline.evaluation.probes import knn_scores, topk_accuracy

    s = params["knn"]
    return topk_accuracy(knn_scores(train_f, train_y, val_f, s["k"], s["temperature"], num_classes), val_y), None


def work(params: dict, args) -> None:
    evaluate(params, args, "knn", protocol)


def main(argv=None) -> None:
    stage_main("knn", __doc__, add_args, check_probe, work, lambda a: layout.node_id("knn", a.seed, a.weights), argv)


if __name__ == "__main__":
    main()
