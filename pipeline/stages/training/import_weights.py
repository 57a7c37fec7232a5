"""import_weights: a released ViT checkpoint (MAE, DeiT, DINO, timm) -> an encoder file of this repository,
results/imported/<file stem>/encoder.safetensors (or --out) with its sidecar JSON.

    python -m pipeline.stages.training.import_weights FILE --format mae|timm|deit|dino [--out PATH] [--force]
        [--num-heads N] [--entry KEY] [--drop-dist-token] [--fc-norm-as-norm] [--expect-params [model|geometry]]
        [--preset P] [--set k=v] [--params FILE]

FILE is a .pth/.pt (torch.load weights_only=True: a pickle that needs code is refused) or a .safetensors file.
The encoder's dict is found in the format's layout, mapped to the encoder's (timm) key names and every shape
checked against the plain ViT its shapes describe (pipeline.models.weights_import has the layouts and rules), all before
anything is written; the file is then written atomically as pipeline.models.encoder.save_encoder writes encoders
(float32 safetensors + sidecar JSON: the model config, and the provenance: source path and sha256, format, the entry it
was found under, the key mapping's counts, where the head count came from) and read back with
pipeline.models.encoder.load_encoder and pipeline.models.encoder_file.load (the loaders of dBOT teachers and
evaluations); a file that does not read back equal is removed. An existing --out is refused unless --force.
Params (--preset, --set) serve the head count of a non-standard width (model.num_heads at width
model.embed_dim) and --expect-params: `model` (the default) fails unless the file is exactly params model and data
(width, depth, heads, patch size, image size, channels); `geometry` only checks what a dBOT stage-0 teacher must
share with the student (image size, patch size, channels; a teacher may be wider or deeper). Run it from the
repository root (params/ and results/ are relative to it). Bad input: `error: ...` (one line), exit 2.

Using an imported encoder as the stage-0 teacher of a dBOT chain: import it first (params validation wants the
file to exist), then name its path in params dbot.chains (a chain name is lowercase letters and digits): in a
preset, params/presets/<name>.yaml, for Snakemake (--config preset=<name>) and DVC
(python -m pipeline.orchestration.dvc_yaml --preset <name>):

    dbot:
      chains: {random: random_init, dino: results/imported/dino_vitbase16_pretrain/encoder.safetensors}

or with the same --set on every node of the chain by hand:

    python -m pipeline.stages.training.import_weights dino_vitbase16_pretrain.pth --format dino --preset P \\
        --expect-params geometry
    CHAIN="--set dbot.chains.dino=results/imported/dino_vitbase16_pretrain/encoder.safetensors"
    python -m pipeline.stages.training.teacher_swap --preset P --stage dino_stage0 $CHAIN
    python -m pipeline.stages.training.pretrain_dbot --preset P --stage dino_stage0 $CHAIN   (then dino_stage1, ...;
        the evaluations of the chain's stages take the same $CHAIN: knn --weights dbot_dino_stage1 $CHAIN)

teacher_swap verifies the sidecar's sha256 and copies it to the chain's stage-0 teacher; the file must see the
student's image size, patch size and channels (data.img_size, model.patch_size, data.channels). An evaluation
node evaluates the imported encoder itself as weights id imported_<name> (results/imported/<name>/, e.g.
`python -m pipeline.stages.evaluation.knn --preset P --weights imported_dino_vitbase16_pretrain`;
layout.IMPORTED_PREFIX).

This command is not a DAG node (its input is outside the study, its output is an input of a study) but it runs through
pipeline.orchestration.cli.stage_main (compute=False, per_seed=False) for the shared conventions: --preset/--set,
one-line errors, and a lock (results/.locks/import_weights-<out>.lock) against two imports to the same file.
"""
from __future__ import annotations

import re
from pathlib import Path

from pipeline import layout
from pipeline.errors import PipelineError
from pipeline.orchestration.cli import stage_main

IMPORTED = layout.IMPORTED_DIR


def add_args(parser) -> None:
    parser.add_argument("file", metavar="FILE", help="the checkpoint: .pth / .pt (torch) or .safetensors")
    parser.add_argument("--format", required=True, help="its layout: mae, timm, deit or dino")
    parser.add_argument("--out", default=None,
                        help="the encoder file to write (default results/imported/<FILE stem>/encoder.safetensors)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads (default: timm's for ViT-Ti/S/B/L/H widths, else params model.num_heads "
                             "when the width is params model.embed_dim)")
    parser.add_argument("--entry", default=None,
                        help="the checkpoint entry holding the encoder (default: the format's, e.g. DINO's teacher; "
                             "--entry student for DINO's student)")
    parser.add_argument("--drop-dist-token", action="store_true",
                        help="import a distilled DeiT without its distillation token (refused otherwise)")
    parser.add_argument("--fc-norm-as-norm", action="store_true",
                        help="use a global-pool model's fc_norm as the final norm (refused otherwise)")
    parser.add_argument("--expect-params", nargs="?", const="model", default=None, choices=("model", "geometry"),
                        help="fail unless the file matches params: model (default; every size) or geometry "
                             "(image size, patch size, channels: what a dBOT stage-0 teacher needs)")


def default_out(file) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(file).stem) or "checkpoint"
    return IMPORTED / stem / "encoder.safetensors"


def check(params: dict, args) -> None:
    """Read, map and check everything now, before anything is written (kept on args for work)."""
    from pipeline.models import weights_import as wi

    if args.format not in wi.FORMATS:
        raise PipelineError(f"unknown --format {args.format!r}; known: {', '.join(wi.FORMATS)}")
    path = Path(args.file)
    if not path.is_file():
        raise PipelineError(f"missing file: {path}")
    args.out = Path(args.out) if args.out else default_out(path)
    if args.out.suffix != ".safetensors":
        raise PipelineError(f"--out {args.out} must end in .safetensors (its sidecar is {layout.sidecar(args.out)})")
    if args.out.resolve() == path.resolve():
        raise PipelineError(f"--out {args.out} is the checkpoint being imported")
    existing = [p for p in (args.out, layout.sidecar(args.out)) if p.exists()]
    if existing and not args.force:
        raise PipelineError(f"{existing[0]} exists; pass --force to overwrite it, or another --out")
    if args.num_heads is not None and args.num_heads < 1:
        raise PipelineError(f"--num-heads {args.num_heads} must be at least 1")
    obj = wi.read_checkpoint(path)
    state, entry = wi.find_state(obj, args.format, path, args.entry)
    del obj
    tensors, mapping = wi.map_state(state, args.format, path, args.drop_dist_token, args.fc_norm_as_norm)
    config, heads_from = wi.infer_config(tensors, path, params["model"], args.num_heads)     # every shape checked
    if args.expect_params:
        problems = wi.params_mismatch(config, *study(params), args.expect_params)
        if problems:
            raise PipelineError(f"{path} does not match params ({args.preset}, --expect-params {args.expect_params}): "
                                f"{'; '.join(problems)}")
    args.imported = (tensors, mapping, config, heads_from, entry)


def work(params: dict, args) -> None:
    from pipeline.checkpoint import save_tensors, sha256_file
    from pipeline.models.weights_import import describe, params_mismatch

    tensors, mapping, config, heads_from, entry = args.imported
    path, out = Path(args.file), args.out
    meta = {"node": "import_weights", "method": "imported", "stage": None, "source": str(path.resolve()),
            "source_sha256": sha256_file(path), "format": args.format, "entry": entry or None,
            "mapping": mapping, "num_heads_from": heads_from}
    save_tensors(out, tensors, dict(meta, model=config))
    try:
        verify(out, tensors, config, params)
    except BaseException:
        out.unlink(missing_ok=True)
        layout.sidecar(out).unlink(missing_ok=True)
        raise
    print(f"import_weights: {path} ({args.format}{', ' + entry if entry else ''}) -> {out}: {describe(config)}; "
          f"{mapping['kept']} tensors, {mapping['renamed']} renamed, {mapping['dropped']} dropped"
          + "".join(f"\nnote: {n}" for n in mapping["notes"]))
    misfit = params_mismatch(config, *study(params), "geometry")
    if misfit:
        print(f"as a dBOT stage-0 teacher of preset {args.preset} it needs {'; '.join(misfit)}")
    else:
        print(f"as a dBOT stage-0 teacher of preset {args.preset}: --set dbot.chains.<name>={out}")


def study(params: dict) -> tuple[dict, int, int]:
    """The study's encoder config and images (params model, data.img_size, data.channels): what a file is compared
    to (pipeline.models.weights_import.params_mismatch)."""
    return params["model"], params["data"]["img_size"], params["data"]["channels"]


def verify(out: Path, tensors: dict, config: dict, params: dict) -> None:
    """The written file loads where teachers and evaluated encoders load, and holds exactly `tensors`."""
    import numpy as np
    import torch

    from pipeline.models import encoder_file
    from pipeline.models.encoder import load_encoder

    enc, _ = load_encoder(out, params["model"], config["in_chans"], config["img_size"])
    arrays, _, _ = encoder_file.load(out, params["model"], config["in_chans"], config["img_size"])
    state = enc.vit.state_dict()
    if set(state) != set(tensors) or any(not torch.equal(state[k], v) for k, v in tensors.items()) or any(
            not np.array_equal(arrays[k], v.numpy()) for k, v in tensors.items()):
        raise PipelineError(f"{out} does not read back as the imported weights; nothing was kept")


def node(args) -> str:
    where = args.out or default_out(args.file)
    return "import_weights-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", str(where)).strip("_")


def main(argv=None) -> None:
    stage_main("import_weights", __doc__, add_args, check, work, node, argv, compute=False, per_seed=False)


if __name__ == "__main__":
    main()
