"""The supervised baseline (pipeline/methods/supervised.py) by its contract: a linear head on the cls token after the
final norm, its weights truncated-normal with std 0.02 (seeded by seed + 1, zero bias), cross-entropy with the
configured label smoothing, the full encoder's FLOPs and no teacher."""
import torch
import torch.nn.functional as F

from pipeline import config
from pipeline.methods import supervised
from pipeline.models import flops
from pipeline.models.encoder import build_encoder
from pipeline.settings import Geometry

PARAMS = config.load("tiny", ["supervised.label_smoothing=0.2"], check_paths=False)


def test_the_loss_is_smoothed_cross_entropy_of_a_linear_head_on_the_cls_token():
    model = supervised.build(PARAMS, 1, seed=3, num_classes=5)
    x, labels = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 4, 0])
    loss, out = model(x, torch.Generator().manual_seed(0), labels=labels)
    logits = model.head(model.encoder(x)[:, 0])
    assert torch.equal(out["logits"], logits)
    assert torch.allclose(loss, F.cross_entropy(logits, labels, label_smoothing=0.2), atol=1e-6)
    assert not torch.allclose(loss, F.cross_entropy(logits, labels), atol=1e-5)   # small logits: close, not equal


def test_the_head_is_seeded_by_seed_plus_one_with_std_0_02():
    model = supervised.build(PARAMS, 1, seed=3)
    encoder = build_encoder(Geometry.of(PARAMS).model, 8, 1, 3)
    same = supervised.Supervised(encoder, 10, 0.2, seed=4)
    assert model.head.out_features == 10                                   # the digits' classes by default
    assert torch.equal(model.head.weight, same.head.weight) and not model.head.bias.any()
    wide = supervised.Supervised(build_encoder(dict(Geometry.of(PARAMS).model.config(), embed_dim=256), 8, 1, 0),
                                 1000, 0.0, seed=0)
    assert abs(wide.head.weight.std().item() - 0.02) < 0.001      # (truncated at +-2 absolute, as timm and MAE do)


def test_labels_follow_the_logits_device():
    """meta stands in for an accelerator: labels given on the CPU meet the logits on the model's device."""
    model = supervised.build(PARAMS, 1, seed=0, num_classes=3).to("meta")
    loss, _ = model(torch.empty(2, 1, 8, 8, device="meta"), torch.Generator(), labels=torch.tensor([0, 2]))
    assert loss.device.type == "meta"


def test_flops_are_the_full_encoders_and_no_teachers():
    assert supervised.forward_flops(PARAMS) == (flops.full_encoder(Geometry.of(PARAMS)), 0.0)
