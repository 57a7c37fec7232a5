"""random_init: a randomly initialised encoder -> results/seed<S>/random_init/encoder.safetensors.

It is the random floor of every evaluation and, by default, dBOT's stage-0 teacher: made with the same
seed as the stage-0 student (pipeline.config.node_seed), it is a frozen copy of the student's own random
initialisation (teacher_swap cuts it to dbot.stage0_teacher_depth blocks when that is set).
Tiny run: python -m pipeline.stages.training.random_init --preset tiny
"""
from pipeline import layout
from pipeline.config import node_seed, section_hash
from pipeline.orchestration.cli import stage_main
from pipeline.orchestration.tracking import tracked

SECTIONS = ["seed", "data", "model"]


def work(params: dict, args) -> None:
    from pipeline.models.encoder import build_encoder, save_encoder

    d = params["data"]
    seed = node_seed(params, "random_init")
    enc = build_encoder(params["model"], d["img_size"], d["channels"], seed)
    out = layout.weights_path("random_init", params["seed"])
    with tracked(params, "random_init", layout.node_id("random_init", params["seed"]), out.parent, SECTIONS,
                 {"weights": "random_init", "evaluated": "random"}):
        save_encoder(out, enc, {"node": "random_init", "method": "random", "stage": None,
                                "seed": seed, "params_hash": section_hash(params, SECTIONS)})
    print(f"random_init: {sum(p.numel() for p in enc.parameters())} parameters -> {out}")


def main(argv=None) -> None:
    stage_main("random_init", __doc__, lambda p: None, lambda params, args: None, work,
               lambda args: layout.node_id("random_init", args.seed), argv, compute=False)


if __name__ == "__main__":
    main()
