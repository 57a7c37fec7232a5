"""segprobe: semantic segmentation with a linear head on frozen patch tokens (mean IoU)
-> results/seed<S>/segprobe/<weights>/{metrics.json, examples.png}.

The dense counterpart of linprobe (pipeline/evaluation/segmentation.py has the details): the encoder is frozen, its
patch tokens are computed once, and a BatchNorm (no affine) + Linear head per token, bilinearly upsampled to the
pixels, is trained with AdamW + cosine lr for segprobe.epochs against per-pixel labels (cross-entropy, 255 =
ignore). Dataset (segprobe.dataset): digit_canvas, 2x2 canvases of half-size digits made deterministically from
the study's own prepared images (data.split_seed), labels 0 = background and 1 + digit class; or folder,
image/mask pairs under segprobe.path. metrics.json: mean IoU over the classes present in ground truth or
prediction, pixel accuracy, per-class IoU, the per-epoch history and how the dataset was made; examples.png:
four val images with their ground truth and prediction.
Tiny run: python -m pipeline.stages.evaluation.segprobe --preset tiny --weights mae
"""
from __future__ import annotations

import time

from pipeline import layout
from pipeline.checkpoint import write_json
from pipeline.config import node_seed
from pipeline.errors import PipelineError
from pipeline.orchestration.cli import stage_main
from pipeline.stages.evaluation import common

PROTOCOL = "segprobe"
SECTIONS = ["seed", "data", PROTOCOL]
EXAMPLES = 4


def check(params: dict, args) -> None:
    common.require_tensor(params, "segprobe")
    common.check(params, args)
    s = params[PROTOCOL]
    if s["dataset"] == "folder":
        from pipeline.evaluation import segmentation  # imports torch: only a folder dataset's check needs it

        segmentation.folder_pairs(s["path"])
    elif s["path"] is not None or s["num_classes"] is not None:
        raise PipelineError(f"segprobe.path and segprobe.num_classes are for segprobe.dataset folder, "
                            f"not {s['dataset']}")


def dataset(params: dict, prep):
    """The segprobe.dataset of the study (prep: its prepared dataset, the source of digit canvases)."""
    from pipeline.evaluation import segmentation

    s, d = params[PROTOCOL], params["data"]
    if s["dataset"] == "digit_canvas":
        return segmentation.digit_canvas(prep, d["split_seed"])
    if s["dataset"] == "folder":
        return segmentation.folder_dataset(s["path"], s.get("num_classes"), d["img_size"], d["channels"],
                                           d["split_seed"], d["val_fraction"])
    raise PipelineError(f"unknown segprobe.dataset {s['dataset']!r}; known: digit_canvas, folder")


def work(params: dict, args) -> dict:
    from pipeline import hardware
    from pipeline.data import datasets
    from pipeline.evaluation import segmentation
    from pipeline.models.encoder import load_encoder
    from pipeline.plots import save_png

    s = params[PROTOCOL]
    prep = datasets.load_prepared()
    seg = dataset(params, prep)
    path = layout.weights_path(args.weights, args.seed)
    encoder, meta = load_encoder(path, params["model"], seg.train_x.shape[1], seg.train_x.shape[-1])
    device = hardware.device(params["launch"]["device"])
    encoder.to(device)
    amp = hardware.resolve(s["precision"], device)
    weights = common.weights_record(args, meta, encoder.config["depth"], path)
    out, node = (layout.eval_metrics(PROTOCOL, args.weights, args.seed),
                 layout.node_id(PROTOCOL, args.seed, args.weights))
    with common.eval_run(params, args, PROTOCOL, weights, SECTIONS, amp) as run:
        start = time.perf_counter()
        train_t = segmentation.patch_tokens(encoder, seg.train_x, prep.mean, prep.std, amp.name, "segprobe train")
        val_t = segmentation.patch_tokens(encoder, seg.val_x, prep.mean, prep.std, amp.name, "segprobe val")
        tokens_s, start = time.perf_counter() - start, time.perf_counter()
        metrics, ious, history, head = segmentation.train_probe(
            train_t, seg.train_m, val_t, seg.val_m, seg.num_classes, encoder.grid, s["epochs"], s["batch_size"],
            s["lr"], s["weight_decay"], node_seed(params, "segprobe"), device)
        probe_s = time.perf_counter() - start
        result = {"protocol": PROTOCOL, "settings": s, "dataset": seg.info, "weights": weights, "metrics": metrics,
                  "per_class_iou": dict(zip(seg.class_names, ious)), "history": history, **amp.record()}
        common.log_history(run, history)
        write_json(out, result)
        n = min(EXAMPLES, len(val_t))
        fig = segmentation.examples_figure(seg.val_x[:n], seg.val_m[:n], segmentation.predict(head, val_t[:n]),
                                           seg.class_names, f"{node}: val mIoU {100 * metrics['miou']:.1f}%")
        save_png(fig, out.parent / "examples.png")
        run.log_metrics(metrics)
        run.log_artifacts(out, out.parent / "examples.png")
    print(f"{node}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.items())
          + f" (patch tokens {tokens_s:.1f} s, probe {probe_s:.1f} s)")
    return result


def main(argv=None) -> None:
    stage_main(PROTOCOL, __doc__, common.add_args, check, work,
               lambda a: layout.node_id(PROTOCOL, a.seed, a.weights), argv)


if __name__ == "__main__":
    main()
