"""pretrain: train one method's student
-> results/seed<S>/pretrain/<method>/ (dBOT: .../pretrain_dbot/<chain>_stage<k>/).

Writes encoder.safetensors (+ .json provenance), metrics.json (loss per epoch, with the online k-NN top-1 of
pretrain.online_knn; images seen, wall time and analytic training FLOPs, pipeline.models.flops), params.yaml,
reconstruction.png (every masked-modelling method: pipeline.reporting.figures) and, for single-stage methods,
checkpoints/epoch<k>.safetensors every pretrain.keep_every_epochs
(evaluated by checkpoint_eval). With dbot.carry_optimizer_state a dBOT node also writes optimizer.pt (its final
AdamW state by parameter name) and stage k > 0 starts from stage k-1's (a declared input). Every node seeds its
init, masks and augmentation with its own seed (pipeline.config.node_seed). Resumable:
state in results/.resume/<node>/ is saved every epoch and every pretrain.checkpoint_every_min minutes;
rerunning a killed node continues from it (only if its params, data, teacher and code are unchanged: the state is keyed
by them) and ends bit-identical.
With launch.tasks N > 1 (executor local or slurm) the node trains in N processes (pipeline.train.distributed).
Tiny runs: python -m pipeline.stages.training.pretrain --preset tiny --method mae
           python -m pipeline.stages.training.pretrain_dbot --preset tiny --stage random_stage0
"""
from __future__ import annotations

import shutil
import sys
from typing import TYPE_CHECKING

from pipeline import dag, layout
from pipeline.checkpoint import load_plain, read_json, save_state, sha256_file, write_json
from pipeline.config import method_params, node_seed, section_hash
from pipeline.errors import PipelineError
from pipeline.methods import NAMES, NEEDS_LABELS, NEEDS_TEACHER
from pipeline.orchestration import fingerprints, params_reads
from pipeline.orchestration.cli import dbot_key, stage_main
from pipeline.orchestration.tracking import tracked

if TYPE_CHECKING:
    from pipeline.hardware import Precision


def add_args(parser) -> None:
    parser.add_argument("--method", required=True, help=f"one of {', '.join(NAMES)}")
    parser.add_argument("--stage", type=dbot_key, default=None,
                        help="dBOT only: the node key <chain>_stage<k>, e.g. random_stage1")


def node_id(args) -> str:
    return layout.pretrain_node(args.method, args.seed, args.stage)


def weights_id(args) -> str:
    return layout.dbot_weights(args.stage) if args.method == "dbot" else args.method


def stage_number(args) -> int:
    """Position in the dBOT chain (0 for every other method)."""
    return layout.parse_dbot_key(args.stage)[1] if args.method == "dbot" else 0


def settings(params: dict, args) -> dict:
    """The pre-training settings of this node: pretrain.*, with the node's own keys over it (a single-stage
    method's <method>.pretrain, a dBOT stage's entry: config.method_params), and supervised's own epochs."""
    s = dict(method_params(params, args.method, stage_number(args))["pretrain"])
    if args.method == "supervised":
        s["epochs"] = params["supervised"]["epochs"]
    return s


def check(params: dict, args) -> None:
    if args.method not in NAMES:
        raise PipelineError(f"unknown method {args.method!r}; known: {', '.join(NAMES)}")
    if args.method == "dbot" and args.stage not in layout.dbot_keys(params):
        raise PipelineError(f"--stage {args.stage}: this study's dBOT nodes are {', '.join(layout.dbot_keys(params))}")
    if args.method != "dbot" and args.stage is not None:
        raise PipelineError(f"--stage is for dbot only, not {args.method}")
    for path in [layout.dataset_path(params)] \
            + ([layout.teacher_path(args.stage, args.seed)] if args.method in NEEDS_TEACHER else []) \
            + [p for p in [carried_optimizer(params, args)] if p is not None]:
        if not path.is_file():
            raise PipelineError(f"missing input {path}: run the node that makes it first")


def carried_optimizer(params: dict, args):
    """The previous dBOT stage's optimizer.pt this node starts from (dbot.carry_optimizer_state), or None."""
    return layout.carried_optimizer(params, args.stage, args.seed) if args.method == "dbot" else None


def work(params: dict, args) -> None:
    from pipeline import hardware, methods, ranks
    from pipeline.data import datasets
    from pipeline.data.stream import bad_record, log_bad_images
    from pipeline.models.encoder import load_encoder
    from pipeline.models.teacher import FrozenTeacher
    from pipeline.reporting.figures import reconstruction_grid
    from pipeline.settings import stream
    from pipeline.train import engine

    study, params = params, method_params(params, args.method, stage_number(args))   # pretrain = this node's own
    prep = datasets.load_dataset(stream(params))  # data.format stream: images decoded and cropped per step
    dataset_hash = read_json(layout.sidecar(layout.dataset_path(params)))["dataset_hash"]
    in_chans, seed = (prep.train_x.shape[1],
                      node_seed(params, args.method, stage_number(args)))   # a fresh student per stage
    carried = carried_optimizer(params, args)
    initial = load_plain(carried) if carried else None
    teacher, teacher_meta = None, {}
    if args.method in NEEDS_TEACHER:
        enc, teacher_meta = load_encoder(layout.teacher_path(args.stage, args.seed), params["model"], in_chans,
                                         params["data"]["img_size"])
        teacher = FrozenTeacher(enc, params["dbot"]["teacher_final_norm"])
    labels = {"num_classes": len(prep.class_names)} if args.method in NEEDS_LABELS else {}
    model = methods.module(args.method).build(params, in_chans, seed, teacher, **labels)   # its module only
    sections = ["seed", "data", "model", "pretrain", args.method]
    logged = study                      # what params.yaml and the params hash record: dBOT the dbot keys it reads
    if args.method == "dbot":
        logged = params_reads.view(study, dag.declared("pretrain_dbot", stage=stage_number(args)))
    s = settings(params, args)
    device = hardware.device(params["launch"]["device"])
    amp = hardware.resolve(s["precision"], device)
    hashes = {"params_hash": section_hash(logged, sections) + dataset_hash[:8] + str(teacher_meta.get("sha256"))[:8]
              + (sha256_file(carried)[:8] if carried else ""),
              "code_hash": fingerprints.code_hash(node_id(args))}     # what a resumable state must be made with
    cfg = engine.TrainConfig(
        epochs=s["epochs"], batch_size=s["batch_size"], lr=s["blr"] * s["batch_size"] / 256, min_lr=s["min_lr"],
        warmup_epochs=s["warmup_epochs"], weight_decay=s["weight_decay"], clip_grad=s["clip_grad"], precision=amp.name,
        crop_scale=s["crop_scale"], hflip=s["hflip"], checkpoint_every_min=s["checkpoint_every_min"], seed=seed,
        config_hash=hashes["params_hash"] + hashes["code_hash"], desc=node_id(args),
        compile=params["launch"]["compile"])
    state = layout.resume_dir(node_id(args)) / "state.pt"
    data = engine.TrainData(prep.train_x, prep.mean, prep.std, prep.train_y)
    if not ranks.world().is_main:    # another process of a launch.tasks job: it only computes gradients
        engine.train(model, data, cfg, engine.Run(state, device=device, initial_optimizer_state=initial))
        return
    out = layout.pretrain_dir(args.method, args.seed, args.stage)
    evaluated = getattr(model, "evaluate_weights", "student")           # EMA methods: student or teacher
    tags = {"method": args.method, "stage": stage_number(args), "weights": weights_id(args), "evaluated": evaluated,
            "dataset_hash": dataset_hash, "teacher_sha256": teacher_meta.get("sha256", "none"), **amp.record()}
    with tracked(logged, layout.describe_weights(weights_id(args))["chain"], node_id(args), out, sections, tags,
                 engine.saved_extra(state, cfg.config_hash).get("run_id")) as run:
        on_epoch = _epoch_end(params, args, model, prep, s["epochs"], state.parent / "checkpoints", run)
        result = engine.train(model, data, cfg, engine.Run(state, on_epoch, {"run_id": run.run_id}, device, initial))
        final = _write_outputs(out, model, result, args, cfg, hashes, teacher_meta, evaluated, params, amp)
        if hasattr(model, "picture"):         # what the model predicts for hidden patches, on val images
            shown = reconstruction_grid(model, datasets.head(prep.val_x, 8), prep.mean, prep.std,
                                        node_seed(params, "pictures"), out / "reconstruction.png",
                                        method=node_id(args))
            run.log_metrics({f"picture_{k}": v for k, v in shown.items()})
            run.log_artifacts(out / "reconstruction.png")
        _promote_checkpoints(state.parent / "checkpoints", out / "checkpoints",
                             layout.kept_epochs(params, weights_id(args)))
        run.log_metrics({"final_loss": final["loss"], "wall_s": final["wall_s"], "images_seen": final["images_seen"],
                         "train_flops": final["train_flops"]})
        log_bad_images(run, bad_record([f for h in result.history for f in h.get("bad_images", [])]))
        run.log_artifacts(out / "metrics.json", layout.sidecar(out / "encoder.safetensors"))
    shutil.rmtree(state.parent, ignore_errors=True)
    print(f"{node_id(args)}: final loss {result.history[-1]['loss']:.4f}, {result.images_seen} images "
          f"in {result.wall_s:.1f} s -> {out}")


def _evaluated(model):
    """The encoder the evaluations see: an EMA method's choice (student or teacher), else the student."""
    return model.evaluated_encoder() if hasattr(model, "evaluated_encoder") else model.encoder


def _epoch_end(params: dict, args, model, prep, epochs: int, kept_dir, run):
    """The engine's on_epoch hook: online k-NN on a fixed subset (stored in the epoch's history entry, so
    a resumed run keeps it), the kept intermediate encoders (in the resume folder until the node ends:
    Snakemake and DVC delete declared outputs before a rerun), then the epoch's metrics to MLflow."""
    from pipeline.data.stream import bad_images
    from pipeline.evaluation.probes import online_knn_top1
    from pipeline.models.encoder import save_encoder
    from pipeline.settings import Knn

    online, kept = params["pretrain"]["online_knn"], layout.kept_epochs(params, weights_id(args))

    def on_epoch(m: dict) -> None:
        done = m["epoch"] + 1
        if online["every_epochs"] and (done % online["every_epochs"] == 0 or done == epochs):
            m["online_knn_top1"] = online_knn_top1(_evaluated(model), prep, Knn.of(online),
                                                   online["train_images"], online["val_images"])
        if done in kept:
            save_encoder(kept_dir / f"epoch{done}.safetensors", _evaluated(model),
                         {"node": node_id(args), "weights": weights_id(args), "epoch": done, "seed": args.seed})
        if bad_images():                # unreadable images skipped so far (data.bad_images: skip): in the state
            m["bad_images"] = bad_images()
        run.log_metrics(m, step=m["epoch"])

    return on_epoch


def _promote_checkpoints(kept_dir, out_dir, epochs: list[int]) -> None:
    """Move the kept encoders (and sidecars) from the resume folder into the node's outputs."""
    for epoch in epochs:
        for suffix in (".safetensors", ".json"):
            src = kept_dir / f"epoch{epoch}{suffix}"
            if not src.is_file():
                raise PipelineError(f"kept checkpoint {src} is missing; delete {kept_dir.parent} and rerun the node")
            out_dir.mkdir(parents=True, exist_ok=True)
            src.replace(out_dir / src.name)


def _write_outputs(out, model, result, args, cfg, hashes: dict, teacher_meta, evaluated: str, params: dict,
                   amp: Precision) -> dict:
    from pipeline.data.stream import bad_record
    from pipeline.models.encoder import save_encoder
    from pipeline.models.flops import flops_per_image

    meta = {"node": node_id(args).split("@")[0], "method": args.method, "stage": stage_number(args),
            "weights": weights_id(args), "evaluated": evaluated, **hashes, "seed": args.seed,
            "init_seed": cfg.seed,
            "teacher": teacher_meta.get("source"), "teacher_sha256": teacher_meta.get("sha256")}
    save_encoder(out / "encoder.safetensors", _evaluated(model), meta)
    if args.method == "dbot" and params["dbot"]["carry_optimizer_state"]:   # the next stage's starting moments
        save_state(layout.optimizer_path(args.stage, args.seed),
                   {name: {k: v.cpu() for k, v in s.items()} for name, s in result.optimizer.items()})
    flops = flops_per_image(params, args.method, teacher_meta.get("model"))
    final = {"loss": result.history[-1]["loss"], "images_seen": result.images_seen, "wall_s": result.wall_s,
             "flops_per_image": flops["train"], "train_flops": flops["train"] * result.images_seen}
    write_json(out / "metrics.json", {**{k: meta[k] for k in ("node", "method", "stage", "weights", "seed")},
                                      "epochs": result.history, "final": final, **amp.record(),
                                      **bad_record([f for h in result.history for f in h.get("bad_images", [])])})
    write_series(out, result.history)
    return final


def write_series(out, history: list[dict]) -> None:
    """The training curves as data series, declared as DVC plots (x epoch, 1-based): loss.csv (epoch,loss) and
    online_knn.csv (epoch,online_knn_top1; the epochs it ran, header only when off)."""
    from pipeline.checkpoint import atomic_write

    for name, column in (("loss", "loss"), ("online_knn", "online_knn_top1")):
        rows = [f"{h['epoch'] + 1},{h[column]}" for h in history if column in h]
        atomic_write(out / f"{name}.csv", lambda p, rows=rows, column=column: p.write_text(
            "\n".join([f"epoch,{column}", *rows]) + "\n"))


def main(argv=None, method: str | None = None) -> None:
    name = layout.pretrain_node(method, 0).split("@")[0] if method else "pretrain"
    if method:
        argv = ["--method", method] + (argv if argv is not None else sys.argv[1:])
    stage_main(name, __doc__, add_args, check, work, node_id, argv, distributed=True)


if __name__ == "__main__":
    main()
