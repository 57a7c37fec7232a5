"""robustness: top-1 of a fine-tuned model on corrupted val images -> results/seed<S>/robustness/<weights>/.

An optional node (robustness.enabled), RC-MAE's robustness table: the model of finetune@seed<S>-<weights>
(results/seed<S>/finetune/<weights>/model.safetensors) evaluated on the clean val split and on every
corruption of robustness.corruptions at every level of robustness.severities (ImageNet-C-like; values in
pipeline/evaluation/robustness.py). The noise is seeded, so reruns are identical. Writes metrics.json (clean and mean
corrupted top-1, top-1 per corruption and severity), robustness.png and params.yaml.
Tiny run: python -m pipeline.stages.evaluation.robustness --preset tiny --weights mae
"""
from __future__ import annotations

import time

from pipeline import layout
from pipeline.checkpoint import write_json
from pipeline.config import node_seed
from pipeline.orchestration.cli import stage_main
from pipeline.stages.evaluation.common import (
    add_args,
    check_weights_id,
    eval_run,
    print_metrics,
    require,
    require_tensor,
)

SECTIONS = ["seed", "finetune", "robustness"]


def check(params: dict, args) -> None:
    check_weights_id(params, args)
    require_tensor(params, "robustness")
    require(layout.DATASET)
    require(layout.finetuned_path(args.weights, args.seed),
            hint=f"run the finetune node {layout.node_id('finetune', args.seed, args.weights)} first "
                 f"(python -m pipeline.stages.evaluation.finetune --seed {args.seed} --weights {args.weights})")


def work(params: dict, args) -> dict:
    from pipeline import hardware
    from pipeline.data import datasets
    from pipeline.evaluation import finetune, robustness
    from pipeline.models.encoder_file import check_input

    start = time.monotonic()
    settings, seed = params["robustness"], params["seed"]
    prep = datasets.load_prepared()
    path = layout.finetuned_path(args.weights, seed)
    model, meta = finetune.load_model(path)
    check_input(path, model.config, prep.val_x.shape[1], prep.val_x.shape[-1])
    weights = dict(meta.get("weights") or {}, finetuned={"path": str(path), "sha256": meta.get("sha256")})
    weights.setdefault("evaluated", "student")
    weights.setdefault("sha256", None)
    out = layout.eval_metrics("robustness", args.weights, seed)
    device = hardware.device(params["launch"]["device"])
    model.to(device)
    amp = hardware.resolve(params["finetune"]["precision"], device)
    with eval_run(params, args, "robustness", weights, SECTIONS, amp) as run:
        top1 = lambda images, desc: finetune.evaluate(model, images, prep.val_y, prep.mean, prep.std, amp.name,
                                                      desc)["top1"]
        clean = top1(prep.val_x, "robustness clean")
        table = {}
        for name in settings["corruptions"]:
            table[name] = {}
            for severity in settings["severities"]:
                acc = top1(robustness.corrupt(prep.val_x, name, severity, node_seed(params, "robustness")),
                           f"robustness {name} {severity}")
                table[name][str(severity)] = acc
                run.log_metrics({f"{name}_top1": acc}, step=severity)
        metrics = {"clean_top1": clean,
                   "mean_corrupted_top1": sum(v for t in table.values() for v in t.values())
                   / sum(len(t) for t in table.values())}
        png = out.parent / "robustness.png"
        robustness.plot(clean, table, png, f"Robustness of fine-tuned {args.weights} (seed {seed})")
        write_json(out, {"protocol": "robustness", "settings": settings, "weights": weights, "metrics": metrics,
                         "corruptions": table, "wall_s": time.monotonic() - start, **amp.record()})
        run.log_metrics(metrics)
        run.log_artifacts(out, png)
    print_metrics("robustness", args, metrics)
    return {"metrics": metrics, "corruptions": table}


def main(argv=None) -> None:
    stage_main("robustness", __doc__, add_args, check, work, lambda a: layout.node_id("robustness", a.seed, a.weights),
               argv)


if __name__ == "__main__":
    main()
