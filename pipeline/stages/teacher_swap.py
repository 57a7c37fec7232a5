"""teacher_swap: make dBOT stage k's teacher -> results/teacher_swap/stage<k>/teacher.safetensors (+ .json).

Stage 0's source is params dbot.stage0_teacher (the random init by default, or any compatible checkpoint:
another method's result, a supervised model, an external timm ViT state dict in safetensors);
stage k > 0's source is stage k-1's student. The source is verified (sha256) and checked against the
student's architecture before it is copied; the sidecar JSON records where the teacher came from.
Tiny run: python -m pipeline.stages.teacher_swap --preset tiny --stage stage0
"""
from pipeline import layout
from pipeline.cli import stage_index, stage_main
from pipeline.config import section_hash
from pipeline.encoder import load_encoder, save_encoder
from pipeline.errors import PipelineError
from pipeline.node import tracked

SECTIONS = ["seed", "data", "model", "dbot"]


def source_path(params: dict, stage: int) -> str:
    return params["dbot"]["stage0_teacher"] if stage == 0 else str(layout.weights_path(f"dbot_stage{stage - 1}"))


def add_args(parser) -> None:
    parser.add_argument("--stage", type=stage_index, required=True, help="dBOT stage whose teacher to make")


def check(params: dict, args):
    """Load and check the source now, before anything is written."""
    if f"stage{args.stage}" not in params["dbot"]["stages"]:
        raise PipelineError(f"--stage {args.stage}: dbot.stages has only {', '.join(params['dbot']['stages'])}")
    src = source_path(params, args.stage)
    enc, meta = load_encoder(src, params, params["data"]["channels"])
    d = params["data"]
    if (enc.config["img_size"], enc.config["patch_size"], enc.config["in_chans"]) != (
            d["img_size"], params["model"]["patch_size"], d["channels"]):
        raise PipelineError(f"teacher {src} sees {enc.config['img_size']}px images in "
                            f"{enc.config['patch_size']}px patches with {enc.config['in_chans']} channels; "
                            f"the student needs {d['img_size']}/{params['model']['patch_size']}/{d['channels']}")
    return enc, meta, src


def work(params: dict, args) -> None:
    enc, meta, src = check(params, args)
    out = layout.teacher_path(args.stage)
    provenance = {"node": "teacher_swap", "stage": args.stage, "source": src, "source_sha256": meta.get("sha256"),
                  "source_node": meta.get("node", "external"), "source_method": meta.get("method"),
                  "source_stage": meta.get("stage"), "params_hash": section_hash(params, SECTIONS)}
    with tracked(params, "dbot", f"teacher_swap@stage{args.stage}", out.parent, SECTIONS,
                 {"stage": args.stage, "teacher_source": src}):
        save_encoder(out, enc, provenance)
    print(f"teacher_swap: stage {args.stage} teacher <- {src} -> {out}")


def main(argv=None) -> None:
    stage_main("teacher_swap", __doc__, add_args, check, work, lambda a: f"teacher_swap@stage{a.stage}", argv,
               compute=False)


if __name__ == "__main__":
    main()
