"""Bad input, as a user would give it, to the real node entry points; and a security scan of the package.

The battery (issue 5 item 6): every case runs a node's CLI entry point on a tiny study whose first outputs were
made once for this module (prepare_data, random_init, knn of random_init), after planting its bad input, and
asserts that the node
- exits with status 2 and prints exactly one line, `error: <message>` (no traceback, nothing else), whose
  message names the problem;
- changed nothing already produced and wrote nothing new: every file under results/ has the same sha256 and
  mtime afterwards as before the run (`snapshot`); results/ is then put back as the fixture made it.
Cases call the stage's `main([...])` in this process (each subprocess pays ~4 s of imports); those with
cli=True run `python -m pipeline.stages.<node>` exactly as a user types it. tests/test_config.py checks each
params problem's message on config.load; here a sample of them goes through the nodes.

The scan (issue 5 item 7): nothing in pipeline/ unpickles (but CIFAR's restricted unpickler), evaluates code,
loads YAML unsafely or runs a shell; torch.load only with weights_only=True.
"""
from __future__ import annotations

import ast
import importlib
import io
import json
import os
import pickle
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import ROOT, copy_dag, run_cli
from PIL import Image
from safetensors.torch import save_file

from pipeline import checkpoint, config, layout
from pipeline.dag import stage_module
from pipeline.data import datasets
from pipeline.errors import PipelineError
from pipeline.evaluation import finetune
from pipeline.models.encoder import build_encoder, save_encoder

TINY = ["--preset", "tiny"]
MARKER = "pwned"          # what the code hidden in a bad pickle or YAML file would create (in the study folder)


# ---- the study the cases run against ---------------------------------------------------------------------

def snapshot(results: Path) -> dict[str, tuple[str, int]]:
    """Every file under results/ -> (sha256, mtime in ns); not the node locks (results/.locks/, see
    pipeline/cli.exclusive), which a node that got past its checks holds while it works."""
    return {str(p.relative_to(results)): (checkpoint.sha256_file(p), p.stat().st_mtime_ns)
            for p in sorted(results.rglob("*")) if p.is_file() and p.relative_to(results).parts[0] != ".locks"}


class Payload:
    """Unpickling this runs `touch pwned`: what a malicious pickle does when it is loaded unsafely."""

    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


def dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def cifar10(root: Path, tweak: Callable[[str, dict], dict] = lambda name, batch: batch) -> None:
    """A miniature cifar-10-batches-py folder (2 images per batch), each batch passed through tweak()."""
    rng = np.random.default_rng(0)
    dump(root / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [2 * b % 10, (2 * b + 1) % 10]}
        dump(root / name, tweak(name, batch))


def image_folder(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8), "L").save(root / name / f"{i}.png")


def external_vit(path: Path, drop: tuple[str, ...] = (), **geometry) -> None:
    """A plain timm ViT state dict in safetensors, no sidecar (an external teacher); tiny's geometry by default."""
    g = dict(dict(img_size=8, in_chans=1, patch_size=2, embed_dim=32, depth=2, num_heads=2), **geometry)
    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **g).state_dict()
    save_file({k: v for k, v in state.items() if k not in drop}, str(path))


@dataclass
class Study:
    root: Path
    params: dict                                # the tiny preset's

    def restore(self) -> None:
        """results/ as the fixture made it: same bytes and mtimes (whatever a case planted or a bad run wrote)."""
        shutil.rmtree(self.root / "results")
        shutil.copytree(self.root / "pristine", self.root / "results", copy_function=shutil.copy2)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study's first outputs and the bad files outside results/, made once; cwd = the study folder."""
    from pipeline.stages.evaluation import knn
    from pipeline.stages.training import prepare_data, random_init

    root = tmp_path_factory.mktemp("bad_input")
    copy_dag(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        prepare_data.main(TINY)
        random_init.main(TINY)
        knn.main(TINY + ["--weights", "random_init"])              # an existing metrics.json
        inputs = root / "inputs"
        inputs.mkdir()
        external_vit(inputs / "teacher_patch4.safetensors", patch_size=4)
        external_vit(inputs / "teacher_no_norm.safetensors", drop=("norm.weight", "norm.bias"))
        external_vit(inputs / "teacher_rgb.safetensors", in_chans=3)
        torch.save({"cls_token": torch.zeros(1, 1, 32), "x": Payload()}, inputs / "teacher_pickle.safetensors")
        image_folder(inputs / "folder_empty_class", {"a": 3, "b": 0})
        image_folder(inputs / "folder_corrupt", {"a": 3, "b": 3})
        (inputs / "folder_corrupt" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
        (inputs / "folder_corrupt" / "a" / "notes.txt").write_text("a stray file is skipped, the corrupt png is not")
        image_folder(inputs / "folder_no_images", {"a": 3, "b": 0})
        (inputs / "folder_no_images" / "b" / "README").write_text("only non-image files: an empty class")
        cifar10(inputs / "cifar_grey", lambda n, b: {**b, b"data": b[b"data"][:, :1024]})       # 1 x 32 x 32 rows
        cifar10(inputs / "cifar_labels", lambda n, b: {**b, b"labels": [10, 0]} if n == "data_batch_2" else b)
        cifar10(inputs / "cifar_pickle_code", lambda n, b: {**b, b"x": Payload()} if n == "data_batch_2" else b)
        (inputs / "code.yaml").write_text(f"pretrain: !!python/object/apply:os.system ['touch {MARKER}']\n")
        shutil.copytree(root / "results", root / "pristine", copy_function=shutil.copy2)
        yield Study(root, config.load("tiny"))


# ---- bad files planted in results/ (each takes the tiny params) ----------------------------------------------

RANDOM_INIT = layout.weights_path("random_init", 0)


def encoder_file(path: Path, params: dict, in_chans: int = 1, img_size: int = 8, **model) -> Path:
    """A valid encoder file (+ sidecar) for in_chans x img_size images: tiny's model, with `model` changed."""
    save_encoder(path, build_encoder(dict(params["model"], **model), img_size, in_chans, seed=0), {"node": "planted"})
    return path


def edit(path: Path, change: Callable[[bytes], bytes]) -> None:
    path.write_bytes(change(path.read_bytes()))


def edit_sidecar(path: Path, change: Callable[[dict], object]) -> None:
    edit(layout.sidecar(path), lambda raw: json.dumps(change(json.loads(raw))).encode())


def flip(raw: bytes) -> bytes:
    """One byte of the tensor data flipped: same length, other sha256."""
    return raw[:-3] + bytes([raw[-3] ^ 0xFF]) + raw[-2:]


def drop_sha256(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "sha256"}


def mae_encoder(**geometry) -> Callable[[dict], None]:
    return lambda params: encoder_file(layout.weights_path("mae", 0), params, **geometry)


def wrong_depth_in_sidecar(params: dict) -> None:
    path = encoder_file(layout.weights_path("mae", 0), params, depth=3)
    edit_sidecar(path, lambda meta: dict(meta, model=dict(meta["model"], depth=2)))   # sha256 still matches


def pickle_as_encoder(params: dict) -> None:
    path = layout.weights_path("mae", 0)
    path.parent.mkdir(parents=True)
    torch.save({"cls_token": torch.zeros(1, 1, 32), "x": Payload()}, path)


def dataset_removed(params: dict) -> None:
    layout.DATASET.unlink()


def dataset_labels_out_of_range(params: dict) -> None:
    prep = datasets.load_prepared()
    prep.train_y = prep.train_y.clone()
    prep.train_y[0] = 12
    datasets.save_prepared(prep, layout.DATASET, {"node": "prepare_data"})          # a valid file: sha256 matches


def rgb_teacher(params: dict) -> None:
    encoder_file(layout.teacher_path("random_stage0", 0), params, in_chans=3)


def rgb_finetuned_model(params: dict) -> None:
    model = finetune.Classifier(build_encoder(params["model"], 8, 3, seed=0).config, 10)
    finetune.save_model(layout.finetuned_path("random_init", 0), model, {"node": "planted"})


def corrupt_kept_checkpoint(params: dict) -> None:
    """mae's outputs as checkpoint_eval reads them, with its kept encoder of epoch 1 corrupted."""
    encoder_file(layout.weights_path("mae", 0), params)
    edit(encoder_file(layout.checkpoint_path("mae", 0, 1), params), flip)
    checkpoint.write_json(layout.weights_path("mae", 0).parent / "metrics.json",
                          {"epochs": [{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.9}]})
    for name in ("knn", "linprobe"):
        checkpoint.write_json(layout.eval_metrics(name, "mae", 0), {"metrics": {"top1": 0.5}})


# ---- the cases ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    node: str                                   # pipeline.stages.<node>
    argv: list[str]
    expect: str                                 # a distinctive part of the one-line message
    plant: Callable[[dict], None] | None = None  # writes the bad files into results/
    cli: bool = False                           # run `python -m pipeline.stages.<node>` in a subprocess


IMAGEFOLDER = ["--set", "data.dataset=imagefolder", "--set"]
CIFAR = ["--set", "data.dataset=cifar", "--set"]
EXTERNAL = ["--stage", "external_stage0", "--set"]     # + dbot.chains.external=<an external teacher file>
HEADS = ROOT / "tests" / "invalid_params" / "heads_do_not_divide.yaml"   # one of test_config's cases, via a node

CASES = [
    # params: schema (unknown key, wrong type, range, enum), cross-field sizes, node arguments, params as data
    Case("params_unknown_key", "prepare_data", ["--set", "data.img_sise=8"],
         "data: Additional properties are not allowed ('img_sise' was unexpected)"),
    Case("params_wrong_type", "pretrain", ["--method", "mae", "--set", "pretrain.batch_size=many"],
         "pretrain.batch_size: 'many' is not of type 'integer'"),
    Case("params_out_of_range", "pretrain", ["--method", "mae", "--set", "pretrain.mask_ratio=1.0"],
         "pretrain.mask_ratio: 1.0 is greater than or equal to the maximum of 1"),
    Case("params_below_minimum", "knn", ["--weights", "random_init", "--set", "knn.k=0"],
         "knn.k: 0 is less than the minimum of 1"),
    Case("params_unknown_method", "pretrain", ["--method", "mea"],
         "unknown method 'mea'; known: mae, dbot, sdae, rcmae, bootmae, supervised"),
    Case("params_unknown_dataset", "prepare_data", ["--set", "data.dataset=svhn"],
         "data.dataset: 'svhn' is not one of ['mnist5k', 'digits', 'imagefolder', 'cifar']"),
    Case("params_patch_does_not_divide_image", "random_init", ["--set", "model.patch_size=3"],
         "model.patch_size 3 does not divide data.img_size 8"),
    Case("params_image_too_small_for_patch", "random_init", ["--set", "data.img_size=4", "--set", "model.patch_size=8"],
         "model.patch_size 8 does not divide data.img_size 4"),
    Case("params_file_heads_do_not_divide", "pretrain", ["--method", "sdae", "--params", str(HEADS)],
         HEADS.read_text().splitlines()[0].removeprefix("# error: ")),
    Case("params_file_missing", "knn", ["--weights", "random_init", "--params", "inputs/nope.yaml"],
         "missing params file: inputs/nope.yaml"),
    Case("params_file_with_code", "knn", ["--weights", "random_init", "--params", "inputs/code.yaml"],
         "inputs/code.yaml is not valid YAML: could not determine a constructor for the tag "
         "'tag:yaml.org,2002:python/object/apply:os.system'"),
    Case("params_override_with_code", "random_init",
         ["--set", f"data.split_seed=__import__('os').system('touch {MARKER}')"],
         "data.split_seed: \"__import__('os').system('touch pwned')\" is not of type 'integer'"),
    Case("params_unknown_preset", "knn", ["--preset", "huge", "--weights", "random_init"], "unknown preset 'huge'"),
    Case("params_seed_not_in_study", "random_init", ["--seed", "3"], "seed 3 is not one of this study's seeds [0]"),
    Case("params_unknown_weights", "knn", ["--weights", "mea"],
         "unknown weights 'mea'; this study has random_init, mae"),
    Case("params_pixels_is_no_encoder", "segprobe", ["--weights", "pixels"],      # the pixel floor: knn, linprobe only
         "unknown weights 'pixels'; this study has random_init, mae"),
    Case("params_stage_for_a_single_stage_method", "pretrain", ["--method", "mae", "--stage", "random_stage0"],
         "--stage is for dbot only, not mae"),
    Case("params_unknown_dbot_stage", "pretrain_dbot", ["--stage", "random_stage7"],
         "--stage random_stage7: this study's dBOT nodes are random_stage0"),
    Case("params_chain_teacher_missing", "teacher_swap", EXTERNAL + ["dbot.chains.external=inputs/nope.safetensors"],
         "dbot.chains.external: 'inputs/nope.safetensors' is neither a weights id of this study"),
    Case("params_mixup_odd_batch", "finetune",
         ["--weights", "random_init", "--set", "finetune.mixup=0.8", "--set", "finetune.batch_size=127"],
         "finetune.mixup/cutmix need an even finetune.batch_size, got 127"),
    Case("params_checkpoint_eval_of_a_method_without_checkpoints", "checkpoint_eval", ["--weights", "supervised"],
         "checkpoint_eval --weights supervised: only mae, sdae, rcmae, bootmae keep intermediate encoders"),
    # data: the dataset prepare_data reads, the prepared dataset the other nodes read
    Case("data_path_missing", "prepare_data", IMAGEFOLDER + ["data.path=inputs/nope"],
         "data.path inputs/nope does not exist or is not a folder"),
    Case("data_empty_class", "prepare_data", IMAGEFOLDER + ["data.path=inputs/folder_empty_class"],
         "empty class folder: inputs/folder_empty_class/b"),
    Case("data_corrupt_image", "prepare_data", IMAGEFOLDER + ["data.path=inputs/folder_corrupt"],
         "cannot read image inputs/folder_corrupt/b/broken.png"),
    Case("data_class_without_images", "prepare_data", IMAGEFOLDER + ["data.path=inputs/folder_no_images"],
         "empty class folder: inputs/folder_no_images/b (1 non-image files)"),
    Case("data_wrong_channel_count", "prepare_data", CIFAR + ["data.path=inputs/cifar_grey"],
         "inputs/cifar_grey/data_batch_1: data must be uint8 rows of 3072 values (3x32x32), got uint8 (2, 1024)"),
    Case("data_labels_out_of_range", "prepare_data", CIFAR + ["data.path=inputs/cifar_labels"],
         "CIFAR-10 inputs/cifar_labels: train labels outside [0, 10)"),
    Case("data_pickle_with_code", "prepare_data", CIFAR + ["data.path=inputs/cifar_pickle_code"],
         "refusing to unpickle posix.system from inputs/cifar_pickle_code/data_batch_2"),
    Case("data_prepared_missing", "knn", ["--weights", "random_init"],
         "missing input results/prepare_data/dataset.safetensors: run the node that makes it first", dataset_removed),
    Case("data_prepared_corrupt", "linprobe", ["--weights", "random_init"],
         "results/prepare_data/dataset.safetensors is corrupt: its sha256 does not match "
         "results/prepare_data/dataset.json",
         lambda params: edit(layout.DATASET, flip)),
    Case("data_prepared_labels_out_of_range", "knn", ["--weights", "random_init"],
         "results/prepare_data/dataset.safetensors: train labels outside [0, 10) (it names 10 classes)",
         dataset_labels_out_of_range),
    Case("data_prepared_sidecar_not_a_mapping", "knn", ["--weights", "random_init"],
         "results/prepare_data/dataset.json is not the sidecar of results/prepare_data/dataset.safetensors: "
         "it records no sha256", lambda params: edit_sidecar(layout.DATASET, lambda meta: [meta])),
    Case("data_channels_of_the_encoder", "knn", ["--weights", "mae"],
         "results/seed0/pretrain/mae/encoder.safetensors takes 3-channel 8px images, but the data has 1-channel 8px",
         mae_encoder(in_chans=3)),
    Case("data_channels_of_the_teacher", "pretrain_dbot", ["--stage", "random_stage0"],
         "results/seed0/teacher_swap/random_stage0/teacher.safetensors takes 3-channel 8px images, but the data has "
         "1-channel 8px", rgb_teacher),
    Case("data_channels_of_the_finetuned_model", "robustness", ["--weights", "random_init"],
         "results/seed0/finetune/random_init/model.safetensors takes 3-channel 8px images, but the data has 1-channel",
         rgb_finetuned_model),
    # checkpoints
    Case("ckpt_wrong_architecture", "knn", ["--weights", "mae"],
         "results/seed0/pretrain/mae/encoder.safetensors does not fit the encoder architecture: unexpected: blocks.2.",
         wrong_depth_in_sidecar),
    Case("ckpt_wrong_image_size", "linprobe", ["--weights", "mae"],
         "results/seed0/pretrain/mae/encoder.safetensors takes 1-channel 16px images, but the data has 1-channel 8px",
         mae_encoder(img_size=16)),
    Case("ckpt_external_wrong_patch", "teacher_swap",
         EXTERNAL + ["dbot.chains.external=inputs/teacher_patch4.safetensors"],
         "teacher inputs/teacher_patch4.safetensors sees 8px images in 4px patches with 1 channels; "
         "the student needs 8/2/1"),
    Case("ckpt_external_wrong_channels", "teacher_swap",
         EXTERNAL + ["dbot.chains.external=inputs/teacher_rgb.safetensors"],
         "inputs/teacher_rgb.safetensors takes 3-channel 8px images, but the data has 1-channel 8px"),
    Case("ckpt_missing_keys", "teacher_swap",
         EXTERNAL + ["dbot.chains.external=inputs/teacher_no_norm.safetensors"],
         "inputs/teacher_no_norm.safetensors does not fit the encoder architecture: missing: norm.weight, norm.bias"),
    Case("ckpt_pickle_for_safetensors", "teacher_swap",
         EXTERNAL + ["dbot.chains.external=inputs/teacher_pickle.safetensors"],
         "inputs/teacher_pickle.safetensors is not a readable safetensors file"),
    Case("ckpt_pickle_as_encoder", "analyze", ["--weights", "mae"],
         "results/seed0/pretrain/mae/encoder.safetensors is not a readable safetensors file", pickle_as_encoder),
    Case("ckpt_truncated", "knn", ["--weights", "random_init"],
         "results/seed0/random_init/encoder.safetensors is corrupt: its sha256 does not match "
         "results/seed0/random_init/encoder.json", lambda params: edit(RANDOM_INIT, lambda raw: raw[:len(raw) // 2]),
         cli=True),
    Case("ckpt_corrupted_teacher_source", "teacher_swap", ["--stage", "random_stage0"],
         "results/seed0/random_init/encoder.safetensors is corrupt: its sha256 does not match",
         lambda params: edit(RANDOM_INIT, flip)),
    Case("ckpt_sidecar_without_sha256", "segprobe", ["--weights", "random_init"],
         "results/seed0/random_init/encoder.json is not the sidecar of results/seed0/random_init/encoder.safetensors: "
         "it records no sha256", lambda params: edit_sidecar(RANDOM_INIT, drop_sha256)),
    Case("ckpt_kept_checkpoint_corrupt", "checkpoint_eval", ["--weights", "mae"],
         "results/seed0/pretrain/mae/checkpoints/epoch1.safetensors is corrupt: its sha256 does not match",
         corrupt_kept_checkpoint),
]


def run_in_process(node: str, argv: list[str], capsys) -> tuple[int, str]:
    """The node's main(argv) as its CLI runs it: (exit status, everything it printed)."""
    if node in ("pretrain_dbot", "supervised"):
        from pipeline.stages.training.pretrain import main
        entry = lambda a: main(a, method="dbot" if node == "pretrain_dbot" else "supervised")
    else:
        entry = importlib.import_module(stage_module(node)).main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        entry(TINY + argv)
    out, err = capsys.readouterr()
    return exit_.value.code, out + err


def run_subprocess(node: str, argv: list[str]) -> tuple[int, str]:
    proc = run_cli(sys.executable, "-m", stage_module(node), *TINY, *argv, check=False, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(case, study, capsys):
    results = study.root / "results"
    try:
        if case.plant:
            case.plant(study.params)
        before = snapshot(results)
        status, printed = (run_subprocess(case.node, case.argv) if case.cli
                           else run_in_process(case.node, case.argv, capsys))
        after = snapshot(results)
    finally:
        study.restore()                  # the next case starts from the same outputs, whatever this one did
    assert status == 2, printed
    assert printed.endswith("\n") and printed.count("\n") == 1, f"not one line:\n{printed}"
    assert printed.startswith("error: ") and "Traceback" not in printed
    assert case.expect in printed, printed
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"results/ changed by a refused run: {changed}"
    assert not (study.root / MARKER).exists(), "code in a bad input file was run"


def test_the_battery_is_large_and_covers_each_kind():
    assert len(CASES) >= 25
    kinds = {c.name.split("_")[0] for c in CASES}
    assert kinds == {"params", "data", "ckpt"}
    assert len({c.name for c in CASES}) == len(CASES)


# ---- security scan of the package source -------------------------------------------------------------------

UNPICKLING = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "_pickle.Unpickler",
              "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load", "marshal.load",
              "marshal.loads", "shelve.open", "pandas.read_pickle", "torch.serialization.load"}
CODE = {"eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec", "builtins.compile"}
SHELL = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"}
UNSAFE_YAML = {"yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"}

# Legitimate uses: (file, what) -> why.
ALLOWED = {
    ("pipeline/data/datasets.py", "pickle.Unpickler"):
        "CIFAR's official archive ships python pickles; datasets._RestrictedUnpickler subclasses pickle.Unpickler and "
        "its find_class admits only numpy's array reconstruction and bytes, any other global is refused, so no "
        "code runs (tests/test_data.py::test_cifar_pickle_with_code_is_refused_not_run, data_pickle_with_code above)",
}


def unsafe_uses(source: str) -> list[tuple[int, str, str]]:
    """(line, what, why) of every use of a loader that can run code, in one Python source. Names are resolved
    through the file's imports (`import numpy as np`, `from pickle import loads`)."""
    tree = ast.parse(source)
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname})
        elif isinstance(node, ast.ImportFrom) and node.module:
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})

    def name(node) -> str | None:
        """`a.b.c` -> 'a.b.c' with the import alias of `a` expanded; None for anything but names and attributes."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        return ".".join([aliases.get(node.id, node.id), *reversed(parts)])

    def arg(call: ast.Call, keyword: str, position: int | None = None):
        """A call's argument: its constant value, else its name, else '?'; None when not given."""
        value = next((kw.value for kw in call.keywords if kw.arg == keyword), None)
        if value is None and position is not None and len(call.args) > position:
            value = call.args[position]
        if value is None:
            return None
        return value.value if isinstance(value, ast.Constant) else (name(value) or "?")

    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute)) and name(node) in UNPICKLING:
            found.append((node.lineno, name(node), "unpickles"))
        if not isinstance(node, ast.Call):
            continue
        func = name(node.func)
        if func in CODE:
            found.append((node.lineno, func, "evaluates code"))
        if func in SHELL or func in UNSAFE_YAML:
            found.append((node.lineno, func, "can run code"))
        if func in ("yaml.load", "yaml.load_all") and not str(arg(node, "Loader", 1)).endswith("SafeLoader"):
            found.append((node.lineno, func, "yaml.load without Loader=yaml.SafeLoader"))
        if func == "torch.load" and arg(node, "weights_only") is not True:
            found.append((node.lineno, func, "torch.load without weights_only=True"))
        if arg(node, "allow_pickle") not in (None, False):
            found.append((node.lineno, f"{func}(allow_pickle=...)", "unpickles"))
        if arg(node, "shell") not in (None, False):
            found.append((node.lineno, f"{func}(shell=...)", "runs a shell"))
    return found


def test_the_scan_finds_each_kind_of_unsafe_loader():
    bad = """
import pickle, yaml, subprocess, torch, numpy as np, pickle as pk
from pickle import loads
x = pickle.load(f); y = loads(b); u = pk.Unpickler(f)
class U(pickle.Unpickler): pass
eval("1"); exec("x = 1"); __import__("os")
yaml.load(s); yaml.load(s, Loader=yaml.Loader); yaml.unsafe_load(s); yaml.full_load(s)
torch.load(p); torch.load(p, weights_only=False); torch.load(p, weights_only=flag)
np.load(p, allow_pickle=True)
subprocess.run("ls", shell=True); os.system("ls")
"""
    ok = """
import numpy as np, yaml
yaml.safe_load(s); yaml.load(s, Loader=yaml.SafeLoader); yaml.load(s, yaml.CSafeLoader)
torch.load(p, map_location="cpu", weights_only=True); np.load(p); np.load(p, allow_pickle=False)
subprocess.run(["git", "status"]); model.eval(); model.compile(); self.load()
"""
    found = unsafe_uses(bad)
    assert len(found) == 17 and {line for line, _, _ in found} == set(range(4, 11)), found
    assert (4, "pickle.loads", "unpickles") in found and (4, "pickle.Unpickler", "unpickles") in found   # via imports
    assert unsafe_uses(ok) == []


def test_the_package_loads_no_pickles_and_runs_no_code_from_its_inputs():
    files = sorted((ROOT / "pipeline").rglob("*.py"))
    assert len(files) > 30
    found, allowed = [], set()
    for path in files:
        rel = str(path.relative_to(ROOT))
        for line, what, why in unsafe_uses(path.read_text()):
            if (rel, what) in ALLOWED:
                allowed.add((rel, what))
            else:
                found.append(f"{rel}:{line}: {what} ({why})")
    assert not found, "\n".join(found)
    assert allowed == set(ALLOWED), "an allow-list entry matches nothing: remove it"
    # the one allowed unpickler really is restricted
    unpickler = datasets._RestrictedUnpickler(io.BytesIO(b""), Path("x"))
    for module, name in (("os", "system"), ("posix", "system"), ("builtins", "eval"), ("subprocess", "Popen")):
        with pytest.raises(PipelineError, match="refusing to unpickle"):
            unpickler.find_class(module, name)
