"""MAE (pipeline/methods/mae.py) by its contract: the encoder sees only the visible patches, the mask comes from the
generator given, the target is the (per-patch normalised, with norm_pix_loss) patchified image, the loss its mean
squared error over the hidden patches, the decoder predicts patch_size**2 * channels values per patch and is
seeded by seed + 1, and the FLOPs are the visible encoder's plus the pixel decoder's."""
import pytest
import torch
from conftest import under_two_global_seeds

from pipeline import config
from pipeline.methods import mae
from pipeline.models import flops, losses
from pipeline.models.decoder import build_decoder
from pipeline.models.encoder import build_encoder
from pipeline.models.masking import random_masking
from pipeline.settings import Geometry


@pytest.fixture(scope="module")
def params():
    """The tiny preset with 4-pixel patches on 3 channels (patch_size ** 2 != 2 * patch_size)."""
    return config.load("tiny", ["model.patch_size=4", "data.img_size=16", "mae.norm_pix_loss=true"],
                       check_paths=False)


def images(n=4, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_the_loss_is_the_mse_of_the_hidden_patches_against_the_normalised_target(params):
    model = mae.build(params, 3, seed=5)
    x = images()
    loss, out = model(x, torch.Generator().manual_seed(1))
    mask = random_masking(4, 16, params["pretrain"]["mask_ratio"], torch.Generator().manual_seed(1))
    assert torch.equal(out["mask"], mask.mask) and out["pred"].shape == (4, 16, 4 * 4 * 3)
    target = losses.normalize_patches(losses.patchify(x, 4))
    assert torch.equal(model.target(x), target)
    hidden = mask.mask.bool()
    assert torch.allclose(loss, ((out["pred"] - target) ** 2).mean(-1)[hidden].mean(), atol=1e-6)
    raw = mae.build(config.merge(params, {"mae": {"norm_pix_loss": False}}), 3, seed=5)
    assert torch.equal(raw.target(x), losses.patchify(x, 4)) and not raw.norm_pix


def test_the_mask_comes_from_the_generator_given():
    """The same generator state gives the same loss, whatever the global RNG did in between."""
    model = mae.build(config.load("tiny", check_paths=False), 1, seed=0)
    x = torch.randn(4, 1, 8, 8)
    (first, _), (second, _) = under_two_global_seeds(lambda gen: model(x, gen))
    assert torch.equal(first, second)


def test_the_prediction_does_not_see_the_hidden_patches(params):
    model = mae.build(params, 3, seed=5).eval()
    x = images()
    mask = random_masking(4, 16, 0.75, torch.Generator().manual_seed(2))
    hidden = losses.unpatchify(mask.mask[..., None].expand(-1, -1, 48), 4, 3).bool()
    changed = torch.where(hidden, images(seed=9), x)
    assert torch.equal(model.reconstruct(x, mask), model.reconstruct(changed, mask))


def test_the_decoder_is_seeded_by_seed_plus_one_and_predicts_every_pixel_value(params):
    model = mae.build(params, 3, seed=5)
    g = Geometry.of(params)
    encoder = build_encoder(g.model, g.img_size, 3, 5)
    decoder = build_decoder(encoder, g.model, 4 ** 2 * 3, 6)
    assert all(torch.equal(a, b) for a, b in zip(model.encoder.state_dict().values(), encoder.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(model.decoder.state_dict().values(), decoder.state_dict().values()))


def test_flops_are_the_visible_encoder_and_the_pixel_decoder(params):
    g = Geometry.of(params)
    assert mae.forward_flops(params) == (flops.visible_encoder(g) + flops.pixel_decoder(g), 0.0)


def test_the_mask_follows_the_images_device():
    """meta stands in for an accelerator: the mask is drawn on the CPU, then moved to the images' device."""
    model = mae.build(config.load("tiny", check_paths=False), 1, seed=0).to("meta")
    loss, out = model(torch.randn(4, 1, 8, 8, device="meta"), torch.Generator().manual_seed(0))
    assert loss.device.type == out["mask"].device.type == out["pred"].device.type == "meta"
