"""dBOT's training step (pipeline/methods/dbot.py) by its contract: the student sees only the visible patches, the
mask comes from the generator given and follows the images' device, the FLOPs are MAE's student plus the frozen
teacher at its own size on every patch, and building without a teacher is a one-line error."""
import pytest
import torch
from conftest import under_two_global_seeds

from pipeline import config
from pipeline.methods import dbot
from pipeline.models import flops, losses
from pipeline.models.decoder import build_decoder
from pipeline.models.encoder import build_encoder
from pipeline.models.masking import random_masking
from pipeline.models.teacher import FrozenTeacher
from pipeline.settings import Geometry

PARAMS = config.load("tiny", check_paths=False)


def model(seed=0):
    return dbot.build(PARAMS, 1, seed, FrozenTeacher(build_encoder(PARAMS["model"], 8, 1, seed=7)))


def test_the_mask_comes_from_the_generator_and_the_student_sees_only_the_visible_patches():
    m = model().eval()
    x = torch.randn(4, 1, 8, 8)
    (loss, out), (again, _) = under_two_global_seeds(lambda gen: m(x, gen))
    assert torch.equal(loss, again)
    mask = random_masking(4, 16, 0.75, torch.Generator().manual_seed(3))
    assert torch.equal(out["mask"], mask.mask)
    hidden = losses.unpatchify(mask.mask[..., None].expand(-1, -1, 4), 2, 1).bool()
    _, changed = m(torch.where(hidden, torch.randn(4, 1, 8, 8), x), torch.Generator().manual_seed(3))
    assert torch.equal(changed["pred"], out["pred"])


def test_the_mask_follows_the_images_device():
    """meta stands in for an accelerator: the mask is drawn on the CPU, then moved to the images' device."""
    m = model().to("meta")
    loss, out = m(torch.empty(4, 1, 8, 8, device="meta"), torch.Generator().manual_seed(0))
    assert loss.device.type == out["mask"].device.type == "meta"


def test_flops_count_the_teacher_at_its_own_size():
    g = Geometry.of(PARAMS)
    wide = dict(PARAMS["model"], embed_dim=64, depth=3)
    assert dbot.forward_flops(PARAMS, wide) == (flops.visible_encoder(g) + flops.pixel_decoder(g),
                                                 flops.full_encoder(g, wide))
    assert flops.full_encoder(g, wide) > flops.full_encoder(g)
    per_image = flops.flops_per_image(PARAMS, "dbot", wide)          # the teacher's config reaches the method
    assert per_image["teacher_forward"] == flops.full_encoder(g, wide)


def test_building_without_a_teacher_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^dbot needs a teacher \(made by the teacher_swap node\)$"):
        dbot.build(PARAMS, 1, 0)


def test_the_student_is_built_from_seed_and_the_decoder_from_seed_plus_one_with_their_own_drop_paths():
    params = config.merge(PARAMS, {"dbot": {"drop_path": 0.1, "decoder_drop_path": 0.3}, "model": {"decoder_depth": 2}})
    teacher = FrozenTeacher(build_encoder(PARAMS["model"], 8, 1, seed=7))
    m = dbot.build(params, 1, 5, teacher)
    g = Geometry.of(params)
    encoder = build_encoder(g.model, g.img_size, 1, 5, drop_path=0.1)
    decoder = build_decoder(encoder, g.model, teacher.width, 6, drop_path=0.3)
    for built, expected in ((m.encoder, encoder), (m.decoder, decoder)):
        assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), expected.state_dict().values()))
        assert [type(x).__name__ for x in built.modules()] == [type(x).__name__ for x in expected.modules()]
    assert m.decoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)       # 0 -> decoder_drop_path
