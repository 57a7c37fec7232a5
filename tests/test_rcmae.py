"""RC-MAE on the tiny preset: its loss is the documented combination (MAE's pixel loss + gamma * the MSE to the EMA
teacher's reconstruction, on the student's own mask), its outputs carry the documented keys, the mask comes from the
given generator (not the global RNG) and follows the images' device, build() hands MAE's norm_pix_loss to the
student, and forward_flops counts the tokens the student and the teacher actually see."""
import pytest
import torch

from pipeline import config
from pipeline.methods import METHODS
from pipeline.models import losses
from pipeline.models.encoder import encoder_flops
from pipeline.models.flops import flops_per_image
from pipeline.models.masking import random_masking
from pipeline.settings import Geometry

KEYS = {"pred", "mask", "mae_loss", "consistency_loss"}


@pytest.fixture(scope="module")
def params():
    return config.load("tiny", check_paths=False)


def make(params, **rcmae):
    return METHODS["rcmae"](config.merge(params, {"rcmae": rcmae}), 1, 0)


def moved_teacher(model):
    """The teacher as after some training: its weights no longer the student's, so the consistency term is not 0."""
    with torch.no_grad():
        for p in model.teacher.module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_is_maes_loss_plus_gamma_times_the_consistency_to_the_teacher(params, norm_pix):
    """loss = MAE loss + gamma * MSE(student, teacher reconstruction) over the masked patches; the MAE loss is what
    MAE itself (same seed, same generator, the mae section's norm_pix_loss) gives on that batch."""
    p = config.merge(params, {"mae": {"norm_pix_loss": norm_pix}})
    gamma = 0.7
    model = moved_teacher(make(p, consistency_weight=gamma))
    assert model.student.norm_pix is norm_pix
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    loss, out = model(x, torch.Generator().manual_seed(0))
    assert set(out) == KEYS
    mae_loss, mae_out = METHODS["mae"](p, 1, 0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(out["mask"], mae_out["mask"]) and torch.allclose(out["pred"], mae_out["pred"])
    assert out["mae_loss"].item() == pytest.approx(mae_loss.item(), rel=1e-6)
    target = losses.patchify(x, 2)
    target = losses.normalize_patches(target) if norm_pix else target
    hidden = out["mask"].bool()
    assert out["mae_loss"].item() == pytest.approx(((out["pred"] - target) ** 2)[hidden].mean().item(), rel=1e-5)
    mask = random_masking(4, 16, 0.75, torch.Generator().manual_seed(0))     # forward's draw, from the same seed
    assert torch.equal(mask.mask, out["mask"])
    teacher_pred = model.teacher.module.reconstruct(x, mask)                   # the teacher's, on the same mask
    consistency = ((out["pred"] - teacher_pred) ** 2)[hidden].mean()
    assert consistency.item() > 1e-4
    assert out["consistency_loss"].item() == pytest.approx(consistency.item(), rel=1e-5)
    assert loss.item() == pytest.approx(out["mae_loss"].item() + gamma * consistency.item(), rel=1e-5)


def test_mask_comes_from_the_generator_not_the_global_rng(params):
    """The same generator gives the same mask and loss whatever the global RNG did in between; another seed another
    mask."""
    model = moved_teacher(make(params)).eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    runs = []
    for global_seed, seed in ((1, 0), (2, 0), (1, 5)):
        torch.manual_seed(global_seed)
        runs.append(model(x, torch.Generator().manual_seed(seed)))
    (loss0, out0), (loss1, out1), (_, out2) = runs
    assert torch.equal(out0["mask"], out1["mask"]) and torch.equal(loss0, loss1)
    assert not torch.equal(out0["mask"], out2["mask"])


def test_forward_runs_where_the_images_are(params):
    """Mask and loss weights follow the images' device (meta stands in for an accelerator here)."""
    model = make(params).to("meta")
    loss, out = model(torch.randn(4, 1, 8, 8, device="meta"), torch.Generator().manual_seed(0))
    assert loss.device.type == "meta" and set(out) == KEYS
    assert all(v.device.type == "meta" for v in out.values())
    assert out["mask"].shape == (4, 16) and out["pred"].shape == (4, 16, 4)


def test_forward_flops_count_the_tokens_student_and_teacher_see(params):
    """Student: the encoder on cls + the visible patches and the pixel decoder on cls + every patch; the EMA
    teacher runs the same MAE on the same mask, so the same count; train = 3 x student + teacher."""
    model = make(params)
    _, out = model(torch.randn(2, 1, 8, 8), torch.Generator().manual_seed(0))
    m = Geometry.of(params).model
    patches, visible = out["mask"].shape[1], int((out["mask"][0] == 0).sum())
    student = encoder_flops(m.embed_dim, m.depth, 1 + visible) + encoder_flops(m.decoder_dim, m.decoder_depth,
                                                                               1 + patches)
    flops = flops_per_image(params, "rcmae")
    assert flops["student_forward"] == pytest.approx(student, rel=1e-12)
    assert flops["teacher_forward"] == pytest.approx(student, rel=1e-12)
    assert flops["train"] == pytest.approx(4 * student, rel=1e-12)
    assert flops["student_forward"] == flops_per_image(params, "mae")["student_forward"]
