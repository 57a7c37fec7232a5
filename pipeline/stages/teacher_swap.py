"""teacher_swap: make the teacher of dBOT node <chain>_stage<k> -> results/seed<S>/teacher_swap/<chain>_stage<k>/teacher.safetensors.

Stage 0's source is the chain's entry in params dbot.chains (the teacher-swap study: the random init, another
method's result, the supervised model, or an external file such as a timm ViT state dict in safetensors, also
one wider or deeper than the student); stage k > 0's source is stage k-1's student of the same chain. The
source is verified (sha256, when it has a sidecar) and checked against the student's input geometry before
it is copied; the sidecar JSON records where the teacher came from.
Tiny run: python -m pipeline.stages.teacher_swap --preset tiny --stage random_stage0
"""
from pipeline import layout
from pipeline.cli import dbot_key, stage_main
from pipeline.config import section_hash
from pipeline.encoder import load_encoder, save_encoder
from pipeline.errors import PipelineError
from pipeline.node import tracked

SECTIONS = ["seed", "data", "model", "dbot"]


def add_args(parser) -> None:
    parser.add_argument("--stage", type=dbot_key, required=True,
                        help="the dBOT node whose teacher to make: <chain>_stage<k>, e.g. random_stage0")


def check(params: dict, args):
    """Load and check the source now, before anything is written."""
    if args.stage not in layout.dbot_keys(params):
        raise PipelineError(f"--stage {args.stage}: this study's dBOT nodes are {', '.join(layout.dbot_keys(params))}")
    src = layout.teacher_source(params, args.stage, args.seed)
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
    chain, stage = layout.parse_dbot_key(args.stage)
    out = layout.teacher_path(args.stage, args.seed)
    provenance = {"node": "teacher_swap", "chain": chain, "stage": stage, "source": src,
                  "source_sha256": meta.get("sha256"), "source_node": meta.get("node", "external"),
                  "source_method": meta.get("method"), "source_stage": meta.get("stage"),
                  "params_hash": section_hash(params, SECTIONS)}
    with tracked(params, f"dbot_{chain}", node(args), out.parent, SECTIONS,
                 {"chain": chain, "stage": stage, "teacher_source": src}):
        save_encoder(out, enc, provenance)
    print(f"{node(args)}: teacher <- {src} -> {out}")


def node(args) -> str:
    return layout.node_id("teacher_swap", args.seed, args.stage)


def main(argv=None) -> None:
    stage_main("teacher_swap", __doc__, add_args, check, work, node, argv,
               compute=False)


if __name__ == "__main__":
    main()
