"""prepare_data: the configured dataset -> results/prepare_data/dataset.safetensors (+ dataset.json).

uint8 images, labels, class names and channel mean/std, split into train/val; later nodes load it fast.
Memory does not grow with the size of an image folder: its images are read one at a time into a temporary
file in results/prepare_data/ and written from there (see pipeline.data).
Tiny run: python -m pipeline.stages.prepare_data --preset tiny
"""
from pipeline import layout
from pipeline.cli import stage_main
from pipeline.config import section_hash
from pipeline.node import tracked

SECTIONS = ["data"]


def work(params: dict, args) -> None:
    from pipeline import data

    # one split for every seed; an image folder's pixels go to an unnamed temporary file beside the output
    prep = data.prepare(params["data"], params["data"]["split_seed"], scratch=layout.DATA_DIR)
    meta = {"node": "prepare_data", "params_hash": section_hash(params, SECTIONS)}
    with tracked(params, "data", "prepare_data", layout.DATA_DIR, SECTIONS) as run:
        saved = data.save_prepared(prep, layout.DATASET, meta)
        run.set_tags({"dataset_hash": saved["dataset_hash"]})
        run.log_metrics({"train_images": len(prep.train_y), "val_images": len(prep.val_y)})
        run.log_artifacts(layout.sidecar(layout.DATASET))
    print(f"prepare_data: {len(prep.train_y)} train / {len(prep.val_y)} val images, "
          f"{len(prep.class_names)} classes -> {layout.DATASET}")


def main(argv=None) -> None:
    stage_main("prepare_data", __doc__, lambda p: None, lambda params, args: None, work,
               lambda args: "prepare_data", argv, compute=False, per_seed=False)


if __name__ == "__main__":
    main()
