"""SdAE on the tiny preset: the loss is 1 - cosine between the student's predictions of each fold's patches and the
EMA teacher's standardised features of them (per token, or across a fold's tokens: cosine_axis); the student sees
only the visible patches; mask and folds come from the given generator (not the global RNG) and follow the images'
device; outputs carry the documented keys; build() passes evaluate_weights and the documented seeds (encoder seed,
decoder seed + 1, random teacher seed + 2, timm init); forward_flops counts the tokens the student and the teacher
actually see (folds sequences of masked // folds + cls, the remainder dropped)."""
import pytest
import torch
import torch.nn.functional as F

from pipeline import config
from pipeline.methods import METHODS
from pipeline.models import losses
from pipeline.models.decoder import build_decoder
from pipeline.models.encoder import build_encoder, encoder_flops
from pipeline.models.flops import flops_per_image
from pipeline.models.masking import multifold_split, random_masking
from pipeline.settings import Geometry

KEYS = {"pred", "mask", "folds"}


@pytest.fixture(scope="module")
def params():
    return config.load("tiny", check_paths=False)


def make(params, seed=0, **sdae):
    return METHODS["sdae"](config.merge(params, {"sdae": sdae}), 1, seed)


def images(seed=1, batch=4):
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("axis", ["channels", "tokens"])
def test_loss_is_one_minus_cosine_to_the_teachers_standardised_fold_features(params, axis):
    """pred (B*F, n, D) holds the student's predictions of each fold's patches (the decoder's outputs at those grid
    positions, from the visible patches of the generator's mask); the targets are the teacher's final features of
    the fold's patches (run as its own sequence), standardised per token; loss = mean of 1 - cosine across channels
    (per token) or across the fold's tokens (per channel)."""
    model = make(params, cosine_axis=axis, teacher_init="random").eval()
    x = images()
    loss, out = model(x, torch.Generator().manual_seed(0))
    assert set(out) == KEYS
    generator = torch.Generator().manual_seed(0)                 # forward's draws, from the same seed
    mask = random_masking(4, 16, 0.75, generator)
    folds = multifold_split(mask, 3, generator)
    assert torch.equal(out["mask"], mask.mask) and torch.equal(out["folds"], folds)
    b, f, n = folds.shape
    student = model.decoder(model.encoder(x, mask.ids_keep), mask.ids_restore)[:, 1:]      # (B, L, D) on the grid
    pred = out["pred"].view(b, f, n, -1)
    assert out["pred"].shape == (b * f, n, 32)
    for i in range(b):
        for k in range(f):
            assert torch.allclose(pred[i, k], student[i, folds[i, k]], atol=1e-6)
    target = losses.standardize_tokens(model.teacher(x.repeat_interleave(f, 0), folds.flatten(0, 1))[:, 1:])
    dim = -1 if axis == "channels" else 1
    expected = (1 - F.cosine_similarity(out["pred"], target, dim=dim)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_student_sees_only_the_visible_patches(params):
    """Changing the hidden patches' pixels leaves the student's predictions as they were."""
    model = make(params).eval()
    x = images()
    _, out = model(x, torch.Generator().manual_seed(0))
    patches = losses.patchify(x, 2)
    hidden = out["mask"].bool()
    patches[hidden] = torch.randn(patches[hidden].shape, generator=torch.Generator().manual_seed(2)) * 5
    _, changed = model(losses.unpatchify(patches, 2, 1), torch.Generator().manual_seed(0))
    assert torch.equal(changed["mask"], out["mask"])
    assert torch.allclose(changed["pred"], out["pred"], atol=1e-6)


def test_mask_and_folds_come_from_the_generator_not_the_global_rng(params):
    """The same generator gives the same mask, folds and loss whatever the global RNG did in between; another seed
    other ones."""
    model = make(params, teacher_init="random").eval()
    x = images()
    runs = []
    for global_seed, seed in ((1, 0), (2, 0), (1, 5)):
        torch.manual_seed(global_seed)
        runs.append(model(x, torch.Generator().manual_seed(seed)))
    (loss0, out0), (loss1, out1), (_, out2) = runs
    assert torch.equal(out0["mask"], out1["mask"]) and torch.equal(out0["folds"], out1["folds"])
    assert torch.equal(loss0, loss1)
    assert not torch.equal(out0["mask"], out2["mask"])


def test_forward_runs_where_the_images_are(params):
    """Mask, folds and loss weights follow the images' device (meta stands in for an accelerator here)."""
    for axis in ("channels", "tokens"):
        model = make(params, cosine_axis=axis).to("meta")
        loss, out = model(torch.randn(4, 1, 8, 8, device="meta"), torch.Generator().manual_seed(0))
        assert loss.device.type == "meta" and loss.shape == () and set(out) == KEYS
        assert all(v.device.type == "meta" for v in out.values())
        assert out["folds"].shape == (4, 3, 4) and out["pred"].shape == (12, 4, 32)


@pytest.mark.parametrize("weights", ["student", "teacher"])
def test_build_passes_evaluate_weights(params, weights):
    """evaluate_weights picks the encoder the pretrain node writes: the student's or the EMA teacher's."""
    model = make(params, evaluate_weights=weights)
    assert model.evaluate_weights == weights
    assert model.evaluated_encoder() is (model.teacher.module if weights == "teacher" else model.encoder)


def test_build_seeds_encoder_decoder_and_random_teacher_as_documented(params):
    """Node seed s: the student's encoder from s, its feature decoder from s + 1 (build_decoder's rule), the random
    teacher from s + 2 with timm's init (the module doc); the copied teacher is the student's encoder."""
    g = Geometry.of(params)
    seed = 7
    model = make(params, seed=seed, teacher_init="random")
    encoder = build_encoder(g.model, 8, 1, seed)
    decoder = build_decoder(encoder, g.model, g.model.embed_dim, seed + 1)
    teacher = build_encoder(g.model, 8, 1, seed + 2, init="timm")
    for built, expected in ((model.encoder, encoder), (model.decoder, decoder), (model.teacher.module, teacher)):
        got = built.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    copied = make(params, seed=seed, teacher_init="student")
    assert all(torch.equal(a, b) for a, b in zip(copied.teacher.module.state_dict().values(),
                                                 encoder.state_dict().values()))


@pytest.mark.parametrize("folds", [1, 3, 5, 12])
def test_forward_flops_count_the_tokens_student_and_teacher_see(params, folds):
    """Student: MAE's (the encoder on cls + the visible patches, the decoder on cls + every patch); teacher: `folds`
    sequences of cls + the fold's patches, as many as forward runs (12 masked patches in 5 folds: 5 x (1 + 2),
    the remainder of 2 dropped)."""
    p = config.merge(params, {"sdae": {"folds": folds}})
    model = METHODS["sdae"](p, 1, 0)
    _, out = model(images(batch=2), torch.Generator().manual_seed(0))
    b, f, n = out["folds"].shape
    assert (f, n) == (folds, 12 // folds)
    m = Geometry.of(p).model
    patches, visible = out["mask"].shape[1], int((out["mask"][0] == 0).sum())
    student = encoder_flops(m.embed_dim, m.depth, 1 + visible) + encoder_flops(m.decoder_dim, m.decoder_depth,
                                                                               1 + patches)
    teacher = f * encoder_flops(m.embed_dim, m.depth, 1 + n)
    flops = flops_per_image(p, "sdae")
    assert flops["student_forward"] == pytest.approx(student, rel=1e-12)
    assert flops["teacher_forward"] == pytest.approx(teacher, rel=1e-12)
    assert flops["train"] == pytest.approx(3 * student + teacher, rel=1e-12)
