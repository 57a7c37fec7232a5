"""Fine-tuning (MAE's protocol): the model built from an encoder, timm's layer-decay groups, RandAugment on
grey and RGB tensors, Mixup, determinism, the saved model, and the finetune node on the tiny preset."""
import json
import shutil

import pytest
import torch
from conftest import COPIED, ROOT
from mlflow.tracking import MlflowClient

from pipeline import layout
from pipeline.config import load
from pipeline.data import datasets
from pipeline.errors import PipelineError
from pipeline.evaluation import finetune
from pipeline.models.encoder import build_encoder, sincos_2d
from pipeline.settings import Finetune

MODEL = dict(arch="vit_tiny_patch16_224", patch_size=2, embed_dim=32, depth=3, num_heads=2)
PNG = b"\x89PNG\r\n\x1a\n"
# the tiny preset with enough steps to learn (its own 1 epoch is all warm-up); RandAugment is tested apart
# (on 8x8 digits its 45% translations and posterize make 4 epochs too few to learn)
LEARN = ["--set", "finetune.epochs=3", "--set", "finetune.batch_size=64", "--set", "finetune.blr=0.02",
         "--set", "finetune.randaug=null"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # the 2 cores are shared: 2 spinning threads are many times slower here
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny study in a temp working dir: prepared digits and a trained (2-epoch) tiny MAE encoder."""
    from pipeline.stages.training import prepare_data, pretrain

    root = tmp_path_factory.mktemp("finetune")
    for name in COPIED:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, root / name)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        prepare_data.main(["--preset", "tiny"])
        pretrain.main(["--preset", "tiny", "--method", "mae"])
        torch.set_num_threads(threads)
        yield root


def tiny_prep(n=128, channels=1, size=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = (torch.rand(n, channels, size, size, generator=g) * 60).to(torch.uint8)
    for c in range(classes):                       # a bright block per class: learnable
        x[y == c, :, (2 * c) % size:(2 * c) % size + 2, :] = 230
    return datasets.Prepared(x, y, x[:32].clone(), y[:32].clone(), [str(c) for c in range(classes)],
                         [0.3] * channels, [0.3] * channels, "synthetic")


def settings(**over):
    return dict(load("tiny")["finetune"], **over)


def test_model_loads_the_encoder_drops_its_norm_and_freezes_positions():
    enc = build_encoder(MODEL, 8, 1, seed=0)
    model = finetune.from_encoder(enc, 10, drop_path=0.1, seed=0).eval()
    state = model.vit.state_dict()
    assert not any(k.startswith("norm.") for k in state) and {"fc_norm.weight", "head.weight"} <= set(state)
    for k, v in enc.vit.state_dict().items():
        if not k.startswith("norm."):
            assert torch.equal(state[k], v), k
    assert not model.vit.pos_embed.requires_grad
    assert torch.equal(model.vit.pos_embed[0], sincos_2d(32, 4))
    assert model.vit.head.weight.abs().max() < 1e-4 and model.vit.head.bias.abs().max() == 0
    x = torch.randn(2, 1, 8, 8)
    _, blocks = enc.eval()(x, return_blocks=(-1,))
    tokens = model.vit.forward_features(x)          # the same blocks (norm = Identity with fc_norm)
    assert torch.allclose(tokens, blocks[2], atol=1e-5)
    pooled = model.features(x, "pooled")
    assert torch.allclose(pooled, model.vit.fc_norm(tokens[:, 1:].mean(1)), atol=1e-5)
    assert model(x).shape == (2, 10)


def test_layer_decay_groups_scale_lr_per_block():
    model = finetune.from_encoder(build_encoder(MODEL, 8, 1, seed=0), 10, 0.0, 0)
    opt = finetune.optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    assert isinstance(opt, torch.optim.AdamW)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.vit.named_parameters())
    assert id(named["pos_embed"]) not in group_of       # frozen: not optimised
    d = MODEL["depth"]
    for name, p in named.items():
        if name == "pos_embed":
            continue
        g = group_of[id(p)]
        if name.startswith("blocks."):
            expected = 0.5 ** (d - int(name.split(".")[1]))
        elif name.startswith(("head", "fc_norm")):
            expected = 1.0
        else:                                            # patch_embed, cls_token: below the first block
            expected = 0.5 ** (d + 1)
        assert g["lr_scale"] == pytest.approx(expected), name
        no_wd = p.ndim <= 1 or name in ("cls_token",)
        assert g["weight_decay"] == (0.0 if no_wd else 0.05), name


def test_randaugment_grey_and_rgb_deterministic_and_posterize_zero_bits():
    for channels in (1, 3):
        prep = tiny_prep(channels=channels, size=16)
        transform = finetune.randaug_transform("rand-m9-mstd0.5-inc1", 16, prep.mean)
        finetune.seed_step(0, 3)
        a = finetune.randaugment(prep.train_x[:8], transform)
        finetune.seed_step(0, 3)
        b = finetune.randaugment(prep.train_x[:8], transform)
        assert a.dtype == torch.uint8 and a.shape == prep.train_x[:8].shape
        assert torch.equal(a, b) and not torch.equal(a, prep.train_x[:8])
    assert finetune.randaug_transform(None, 16, [0.5]) is None
    from PIL import Image
    black = finetune._posterize(Image.new("RGB", (4, 4), (200, 100, 50)), 0)
    assert black.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_mixup_gives_soft_targets_and_soft_target_loss():
    prep = tiny_prep()
    s = settings(mixup=0.8, cutmix=1.0)
    mixup = finetune.mixup_fn(Finetune.of(s), 4)
    assert finetune.mixup_fn(Finetune.of(settings(mixup=0.0, cutmix=0.0)), 4) is None
    finetune.seed_step(0, 0)
    x, y = finetune.train_batch(prep.train_x[:16], prep.train_y[:16], prep, None, mixup, "cpu")
    assert x.dtype == torch.float32 and y.shape == (16, 4)
    assert torch.allclose(y.sum(1), torch.ones(16)) and (y < 1).all()
    from timm.loss import SoftTargetCrossEntropy
    assert isinstance(finetune.loss_fn(Finetune.of(s), mixup), SoftTargetCrossEntropy)
    hard = finetune.loss_fn(Finetune.of(settings()), None)(torch.zeros(2, 4), torch.tensor([0, 1]))
    assert hard.item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-5)


def test_two_runs_are_identical_and_global_rng_is_restored():
    prep = tiny_prep(n=96, size=8)
    s = settings(epochs=2, batch_size=32, mixup=0.8, cutmix=1.0, drop_path=0.2)
    enc = build_encoder(MODEL, 8, 1, seed=0)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        before = torch.rand(1)
        torch.manual_seed(123)
        model = finetune.from_encoder(enc, 4, s["drop_path"], seed=0)
        metrics, history = finetune.finetune(model, prep, Finetune.of(s), seed=0, device="cpu")
        assert torch.equal(torch.rand(1), before)          # the caller's RNG stream is untouched
        runs.append((metrics, history, model.vit.state_dict()))
    (m1, h1, w1), (m2, h2, w2) = runs
    assert m1 == m2 and h1 == h2 and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert [h["epoch"] for h in h1] == [0, 1] and set(h1[0]) == {"epoch", "train_loss", "val_top1", "lr"}


def test_saved_model_round_trip_and_corruption(tmp_path):
    model = finetune.from_encoder(build_encoder(MODEL, 8, 1, seed=0), 10, 0.1, 0).eval()
    path = tmp_path / "model.safetensors"
    finetune.save_model(path, model, {"node": "finetune"})
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["num_classes"] == 10 and meta["model"]["depth"] == 3
    loaded, _ = finetune.load_model(path)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with pytest.raises(PipelineError, match="corrupt"):
        finetune.load_model(path)


def test_finetune_node_beats_chance_and_writes_its_outputs(study):
    from pipeline.stages.evaluation import finetune as stage

    stage.main(["--preset", "tiny", "--weights", "mae", *LEARN])
    out = layout.eval_metrics("finetune", "mae", 0)
    doc = json.loads(out.read_text())
    assert doc["protocol"] == "finetune" and doc["settings"]["epochs"] == 3 and doc["wall_s"] > 0
    assert doc["weights"]["id"] == "mae" and doc["weights"]["sha256"] and doc["weights"]["depth"] == 2
    assert set(doc["metrics"]) == {"top1", "top5"} and len(doc["history"]) == 3
    assert doc["metrics"]["top1"] > 0.25                  # 10 classes: chance is 0.1
    assert doc["history"][-1]["val_top1"] == doc["metrics"]["top1"]
    assert (out.parent / "curve.png").read_bytes()[:8] == PNG
    model, meta = finetune.load_model(layout.finetuned_path("mae", 0))
    assert meta["num_classes"] == 10 and meta["weights"] == doc["weights"]
    prep = datasets.load_prepared()
    again = finetune.evaluate(model, prep.val_x, prep.val_y, prep.mean, prep.std)
    assert again["top1"] == pytest.approx(doc["metrics"]["top1"])

    client = MlflowClient(f"sqlite:///{study}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              "attributes.run_name = 'finetune@seed0-mae'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.metrics["top1"] == pytest.approx(doc["metrics"]["top1"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == [0, 1, 2]
    assert {"metrics.json", "curve.png", "model.json", "params.yaml"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.parametrize("weights, message", [
    ("nope", "unknown weights 'nope'"),
    ("sdae", "missing input results/seed0/pretrain/sdae/encoder.safetensors")])
def test_bad_input_is_a_one_line_error_before_any_work(study, capsys, weights, message):
    from pipeline.stages.evaluation import finetune as stage

    with pytest.raises(SystemExit) as e:
        stage.main(["--preset", "tiny", "--weights", weights])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: {message}") and "\n" not in err
    assert not layout.eval_metrics("finetune", weights, 0).parent.exists()


def test_odd_batch_with_mixup_is_refused(study, capsys):
    from pipeline.stages.evaluation import finetune as stage

    with pytest.raises(SystemExit):
        stage.main(["--preset", "tiny", "--weights", "mae", "--set", "finetune.mixup=0.8",
                    "--set", "finetune.batch_size=63"])
    assert "even finetune.batch_size" in capsys.readouterr().err
