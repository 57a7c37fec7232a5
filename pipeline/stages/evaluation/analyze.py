"""analyze: representation analyses of one encoder
-> results/seed<S>/analyze/<weights>/{analysis.json,attention_heads.png}.

As the dBOT repository's analyses: mean attention distance per layer and head, and the share of the top-k
singular values of each layer's normalised patch-token matrix, on the first `analyze.images` validation
images (full image, eval mode). The report draws them for every encoder side by side.
Tiny run: python -m pipeline.stages.evaluation.analyze --preset tiny --weights mae
"""
from pipeline import layout
from pipeline.checkpoint import write_json
from pipeline.orchestration.cli import stage_main
from pipeline.orchestration.tracking import tracked
from pipeline.stages.evaluation.common import add_args, require_tensor
from pipeline.stages.evaluation.common import check as check_inputs


def check(params: dict, args) -> None:
    require_tensor(params, "analyze")
    check_inputs(params, args)


def work(params: dict, args) -> None:
    from pipeline.data import datasets
    from pipeline.evaluation import representations
    from pipeline.models.encoder import load_encoder
    from pipeline.reporting.figures import attention_grid

    prep = datasets.load_prepared()
    encoder, meta = load_encoder(layout.weights_path(args.weights, args.seed), params["model"], prep.train_x.shape[1],
                                 prep.train_x.shape[-1])
    images = datasets.normalize(prep.val_x[:params["analyze"]["images"]], prep.mean, prep.std)
    out = layout.analysis_path(args.weights, args.seed)
    info = layout.describe_weights(args.weights)
    with tracked(params, info["chain"], node(args), out.parent, ["seed", "analyze"],
                 {"weights": args.weights, "weights_sha256": meta.get("sha256")}) as run:
        distance = representations.mean_attention_distance(encoder, images)
        share = representations.singular_value_share(encoder, images, params["analyze"]["top_k"])
        attention_grid(encoder, prep.val_x, prep.mean, prep.std, out.parent / "attention_heads.png")
        write_json(out, {"weights": {"id": args.weights, "method": info["method"], "stage": info["stage"],
                                     "seed": args.seed, "sha256": meta.get("sha256")},
                         "settings": params["analyze"],
                         "attention_distance": distance.tolist(), "singular_value_share": share.tolist()})
        run.log_metrics({f"attention_distance_layer{i}": float(v) for i, v in enumerate(distance.mean(1))})
        run.log_metrics({f"singular_value_share_layer{i}": float(v) for i, v in enumerate(share)})
        run.log_artifacts(out, out.parent / "attention_heads.png")
    print(f"{node(args)}: mean attention distance per layer "
          + ", ".join(f"{v:.1f}" for v in distance.mean(1).tolist()) + f" px -> {out}")


def node(args) -> str:
    return layout.node_id("analyze", args.seed, args.weights)


def main(argv=None) -> None:
    stage_main("analyze", __doc__, add_args, check, work, node, argv)


if __name__ == "__main__":
    main()
