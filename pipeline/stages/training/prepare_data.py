"""prepare_data: the configured dataset -> results/prepare_data/dataset.safetensors (+ dataset.json), or, for a
streamed image folder (data.format stream, or auto above data.tensor_budget_gb), results/prepare_data/manifest.jsonl
(+ manifest.json).

tensor: uint8 images, labels, class names and channel mean/std, split into train/val; later nodes load it fast.
Memory does not grow with the size of an image folder: its images are read one at a time into a temporary
file in results/prepare_data/ and written from there (see pipeline.data.datasets).
stream: no pixels are copied: one line per image file (relative path, label, size in bytes), split as for the
tensor format, with class names and the channel mean/std of a seeded sample of train images (pipeline.data.stream).
The raw folder itself is not an output: under DVC, track it with `dvc add data/<folder>` (or an import stage)
and make its .dvc file a dep of this stage.
Tiny run: python -m pipeline.stages.training.prepare_data --preset tiny
"""
from pipeline import layout
from pipeline.config import section_hash
from pipeline.orchestration.cli import stage_main
from pipeline.orchestration.tracking import tracked

SECTIONS = ["data"]


def work(params: dict, args) -> None:
    if layout.data_format(params["data"]) == "stream":
        return stream_work(params)
    from pipeline.data import datasets, folders

    # one split for every seed; an image folder's pixels go to an unnamed temporary file beside the output
    prep = datasets.prepare(params["data"], params["data"]["split_seed"], scratch=layout.DATA_DIR)
    meta = {"node": "prepare_data", "params_hash": section_hash(params, SECTIONS)}
    with tracked(params, "data", "prepare_data", layout.DATA_DIR, SECTIONS) as run:
        saved = datasets.save_prepared(prep, layout.DATASET, meta)
        run.set_tags({"dataset_hash": saved["dataset_hash"]})
        run.log_metrics({"train_images": len(prep.train_y), "val_images": len(prep.val_y),
                         "skipped_files": sum(prep.skipped.values())})
        run.log_artifacts(layout.sidecar(layout.DATASET))
    skipped = f", {folders.skipped_note(prep.skipped)}" if prep.skipped else ""
    print(f"prepare_data: {len(prep.train_y)} train / {len(prep.val_y)} val images, "
          f"{len(prep.class_names)} classes{skipped} -> {layout.DATASET}")


def stream_work(params: dict) -> None:
    from pipeline import hardware
    from pipeline.data import folders, stream
    from pipeline.settings import Loader, Stream

    d, seed = params["data"], params["data"]["split_seed"]
    man = stream.scan(d, seed)
    loader = Loader.of(params, hardware.device(params["launch"]["device"]))
    mean, std = stream.channel_stats(man, Stream.folder(d, loader), seed)
    meta = {"node": "prepare_data", "params_hash": section_hash(params, SECTIONS), "mean": mean, "std": std,
            "root": str(d["path"]), "source": f"imagefolder {d['path']} ({len(man.class_names)} classes, streamed)",
            "stats_images": min(len(man.labels["train"]), stream.STATS_IMAGES),
            **stream.bad_record()}              # unreadable images of the stats sample (data.bad_images: skip)
    with tracked(params, "data", "prepare_data", layout.DATA_DIR, SECTIONS) as run:
        saved = stream.save_manifest(man, layout.MANIFEST, meta)
        stream.log_bad_images(run, stream.bad_record())
        run.set_tags({"dataset_hash": saved["dataset_hash"], "format": "stream"})
        run.log_metrics({"train_images": saved["counts"]["train"], "val_images": saved["counts"]["val"],
                         "skipped_files": saved["skipped_files"]})
        run.log_artifacts(layout.sidecar(layout.MANIFEST))
    print(f"prepare_data: {saved['counts']['train']} train / {saved['counts']['val']} val images, "
          f"{len(man.class_names)} classes, {folders.skipped_note(man.skipped)} -> {layout.MANIFEST}")


def main(argv=None) -> None:
    stage_main("prepare_data", __doc__, lambda p: None, lambda params, args: None, work,
               lambda args: "prepare_data", argv, compute=False, per_seed=False)


if __name__ == "__main__":
    main()
