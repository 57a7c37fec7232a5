"""finetune: full fine-tuning of an encoder (MAE's protocol) -> results/seed<S>/finetune/<weights>/.

The pre-trained ViT with global average pooling, a new LayerNorm and a linear head, trained end to end for
finetune.epochs with AdamW + layer-wise lr decay, RandAugment, label smoothing (or Mixup/CutMix), drop path;
val top-1 after every epoch (pipeline/evaluation/finetune.py). Writes metrics.json (settings, weights record, final
top-1/top-5, per-epoch history, wall time), model.safetensors (+ model.json: config and class count, read by
the robustness node), curve.png (train loss and val top-1 per epoch) and params.yaml.
Tiny run: python -m pipeline.stages.evaluation.finetune --preset tiny --weights mae
"""
from __future__ import annotations

import time
from dataclasses import replace

from pipeline import layout
from pipeline.checkpoint import write_json
from pipeline.config import node_seed, section_hash
from pipeline.errors import PipelineError
from pipeline.orchestration.cli import stage_main
from pipeline.stages.evaluation.common import add_args, eval_run, log_history, print_metrics, weights_record
from pipeline.stages.evaluation.common import check as check_inputs

SECTIONS = ["seed", "finetune"]


def check(params: dict, args) -> None:
    check_inputs(params, args)
    s = params["finetune"]
    if (s["mixup"] > 0 or s["cutmix"] > 0) and s["batch_size"] % 2:
        raise PipelineError(f"finetune.mixup/cutmix need an even finetune.batch_size, got {s['batch_size']}")


def work(params: dict, args) -> dict:
    from pipeline import hardware
    from pipeline.data import datasets
    from pipeline.evaluation import finetune
    from pipeline.models.encoder import load_encoder
    from pipeline.settings import Finetune, stream

    start = time.monotonic()
    settings, seed = params["finetune"], params["seed"]
    prep = datasets.load_dataset(stream(params))  # data.format stream: train transform, then RandAugment
    path = layout.weights_path(args.weights, seed)
    encoder, meta = load_encoder(path, params["model"], prep.train_x.shape[1], prep.train_x.shape[-1])
    weights = weights_record(args, meta, encoder.config["depth"], path)
    draws = node_seed(params, "finetune")                 # head init, batch order, augmentation, drop path
    model = finetune.from_encoder(encoder, len(prep.class_names), settings["drop_path"], draws)
    out = layout.eval_metrics("finetune", args.weights, seed)
    node = layout.node_id("finetune", seed, args.weights)
    device = hardware.device(params["launch"]["device"])
    amp = hardware.resolve(settings["precision"], device)
    with eval_run(params, args, "finetune", weights, SECTIONS, amp) as run:
        metrics, history = finetune.finetune(model, prep, replace(Finetune.of(settings), precision=amp.name), draws,
                                             device, desc=node, on_epoch=lambda h: log_history(run, [h]))
        model_path = layout.finetuned_path(args.weights, seed)
        finetune.save_model(model_path, model, {"node": "finetune", "weights": weights,
                                                "class_names": prep.class_names,
                                                "params_hash": section_hash(params, SECTIONS)})
        curve = out.parent / "curve.png"
        finetune.plot_curve(history, curve, f"Fine-tuning {args.weights} (seed {seed})")
        result = {"protocol": "finetune", "settings": settings, "weights": weights, "metrics": metrics,
                  "history": history, "wall_s": time.monotonic() - start, **amp.record()}
        write_json(out, result)
        run.log_metrics(metrics)
        run.log_artifacts(out, curve, layout.sidecar(model_path))
    print_metrics("finetune", args, metrics)
    return result


def main(argv=None) -> None:
    stage_main("finetune", __doc__, add_args, check, work,
               lambda a: layout.node_id("finetune", a.seed, a.weights), argv)


if __name__ == "__main__":
    main()
