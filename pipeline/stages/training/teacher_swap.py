"""teacher_swap: make the teacher of dBOT node <chain>_stage<k>
-> results/seed<S>/teacher_swap/<chain>_stage<k>/teacher.safetensors.

Stage 0's source is the chain's entry in params dbot.chains (the teacher-swap study: the random init, another
method's result, the supervised model, or an external file such as a timm ViT state dict in safetensors, also
one wider or deeper than the student); stage k > 0's source is stage k-1's student of the same chain. The
source is verified (sha256, when it has a sidecar) and checked against the student's input geometry before
it is copied; the sidecar JSON records where the teacher came from. With dbot.stage0_teacher_depth set, the random
stage-0 teacher (a chain starting from random_init) keeps only its first k blocks: 0 = the patch embedding and
positions, the official ViT-L/H stage-0 teacher (dbot PRETRAIN.md:37 --init_teacher_encoder_depth 0,
main_pretrain.py:179-180, :220); trained teachers are copied whole. The weights are checked and copied as numpy
arrays (pipeline.models.encoder_file): the node imports neither torch nor timm, and writes what save_encoder would.
Tiny run: python -m pipeline.stages.training.teacher_swap --preset tiny --stage random_stage0
"""
from pipeline import dag, layout
from pipeline.config import section_hash
from pipeline.errors import PipelineError
from pipeline.models import encoder_file
from pipeline.orchestration import params_reads
from pipeline.orchestration.cli import dbot_key, stage_main
from pipeline.orchestration.tracking import tracked

SECTIONS = ["seed", "data", "model", "dbot"]


def add_args(parser) -> None:
    parser.add_argument("--stage", type=dbot_key, required=True,
                        help="the dBOT node whose teacher to make: <chain>_stage<k>, e.g. random_stage0")


def check(params: dict, args):
    """Load and check the source now, before anything is written."""
    if args.stage not in layout.dbot_keys(params):
        raise PipelineError(f"--stage {args.stage}: this study's dBOT nodes are {', '.join(layout.dbot_keys(params))}")
    src = layout.teacher_source(params, args.stage, args.seed)
    arrays, config, meta = encoder_file.load(src, params["model"], params["data"]["channels"],
                                             params["data"]["img_size"])
    d = params["data"]
    if (config["img_size"], config["patch_size"], config["in_chans"]) != (
            d["img_size"], params["model"]["patch_size"], d["channels"]):
        raise PipelineError(f"teacher {src} sees {config['img_size']}px images in "
                            f"{config['patch_size']}px patches with {config['in_chans']} channels; "
                            f"the student needs {d['img_size']}/{params['model']['patch_size']}/{d['channels']}")
    depth = stage0_depth(params, args.stage)
    if depth is not None:
        arrays, config = encoder_file.truncated(arrays, config, depth)
    return arrays, config, meta, src


def stage0_depth(params: dict, key: str) -> int | None:
    """dbot.stage0_teacher_depth for the random stage-0 teacher of chain <key>, else None (the teacher whole)."""
    chain, stage = layout.parse_dbot_key(key)
    random = stage == 0 and params["dbot"]["chains"][chain] == "random_init"
    return params["dbot"]["stage0_teacher_depth"] if random else None


def work(params: dict, args) -> None:
    arrays, config, meta, src = check(params, args)
    chain, stage = layout.parse_dbot_key(args.stage)
    out = layout.teacher_path(args.stage, args.seed)
    logged = params_reads.view(params, dag.declared("teacher_swap", chain=chain))   # its dbot keys only
    provenance = {"node": "teacher_swap", "chain": chain, "stage": stage, "source": src,
                  "source_sha256": meta.get("sha256"), "source_node": meta.get("node", "external"),
                  "source_method": meta.get("method"), "source_stage": meta.get("stage"),
                  "depth": config["depth"], "source_depth": meta.get("model", {}).get("depth"),
                  "params_hash": section_hash(logged, SECTIONS)}
    with tracked(logged, f"dbot_{chain}", node(args), out.parent, SECTIONS,
                 {"chain": chain, "stage": stage, "teacher_source": src}):
        encoder_file.save(out, arrays, config, provenance)
    print(f"{node(args)}: teacher <- {src} -> {out}")


def node(args) -> str:
    return layout.node_id("teacher_swap", args.seed, args.stage)


def main(argv=None) -> None:
    stage_main("teacher_swap", __doc__, add_args, check, work, node, argv,
               compute=False)


if __name__ == "__main__":
    main()
