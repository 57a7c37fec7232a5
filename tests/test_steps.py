"""pipeline.data.steps by values: the stream key of each seed, the seeded epoch order cut in full batches, and the
batched crop and flip (identity at crop scale 1, pinned draws of a seed, its params checked, run on the images'
device)."""
import pytest
import torch

from pipeline.data.steps import STREAM_OF_SEED_0, augment, batch_indices, epoch_order, stream_key
from pipeline.errors import PipelineError


def test_seed_zero_draws_from_its_own_stream_and_every_other_seed_from_itself():
    assert (stream_key(0), stream_key(1), stream_key(37)) == (STREAM_OF_SEED_0, 1, 37)
    assert not torch.equal(epoch_order(50, 0, 0), epoch_order(50, 1, 0))


def test_epoch_orders_are_pinned_permutations():
    """The order a seed draws is pinned (a resumed run and a study's numbers rest on it)."""
    assert epoch_order(10, 3, 0).tolist() == [5, 3, 0, 4, 1, 7, 8, 9, 2, 6]
    assert epoch_order(10, 0, 1).tolist() == [2, 9, 3, 4, 8, 6, 1, 0, 5, 7]


def test_the_steps_of_an_epoch_cut_its_order_in_full_batches():
    order = epoch_order(10, 3, 0)
    assert [batch_indices(10, 3, 3, step).tolist() for step in range(3)] == [order[i:i + 3].tolist() for i in (0, 3, 6)]
    assert torch.equal(batch_indices(10, 3, 3, 3), epoch_order(10, 3, 1)[:3])        # step 3 opens epoch 1
    assert torch.equal(batch_indices(10, 64, 3, 1), epoch_order(10, 3, 1))           # a batch is at most n images


def test_crop_scale_one_without_flip_is_the_identity():
    x = torch.randint(0, 256, (3, 2, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment(x, torch.Generator().manual_seed(1), (1.0, 1.0), False)
    assert out.dtype == torch.float32 and torch.allclose(out, x.float() / 255, atol=1e-6)
    flipped = augment(x, torch.Generator().manual_seed(1), (1.0, 1.0), True)
    assert all(torch.allclose(f, i.float() / 255, atol=1e-6) or torch.allclose(f, i.flip(-1).float() / 255, atol=1e-6)
               for f, i in zip(flipped, x))
    assert not torch.allclose(flipped, out)                   # seed 1 flips some of the three


def test_the_crops_of_a_seed_are_pinned():
    x = torch.arange(32, dtype=torch.uint8).view(2, 1, 4, 4) * 7
    out = (augment(x, torch.Generator().manual_seed(0), (0.3, 0.9), True) * 255).round().long()
    assert out.tolist() == [[[[8, 15, 21, 28], [34, 40, 47, 54], [59, 66, 73, 79], [84, 91, 98, 105]]],
                            [[[133, 127, 121, 115], [159, 154, 148, 142], [186, 180, 175, 169], [213, 207, 201, 196]]]]


@pytest.mark.parametrize("scale", [(0.0, 1.0), (0.6, 0.5), (0.5, 1.01)])
def test_a_bad_crop_scale_is_a_one_line_error(scale):
    with pytest.raises(PipelineError, match="crop_scale must satisfy 0 < min <= max <= 1"):
        augment(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.Generator().manual_seed(0), scale, False)


def test_small_crops_keep_their_aspect_ratio_within_three_quarters_and_four_thirds():
    """At crop scale (0.1, 0.3) the aspect ratio's bounds (3/4, 4/3) always bind: the crops of a seed are pinned."""
    x = torch.arange(4 * 64).view(4, 1, 8, 8).remainder(251).to(torch.uint8)
    out = (augment(x, torch.Generator().manual_seed(5), (0.1, 0.3), False) * 255).round().long()
    assert out[:, 0, ::3, ::3].tolist() == [
        [[9, 11, 12], [22, 23, 24], [34, 35, 36]], [[91, 93, 94], [103, 105, 107], [116, 117, 119]],
        [[137, 138, 140], [148, 149, 150], [158, 159, 160]], [[219, 220, 221], [229, 230, 232], [239, 241, 242]]]


def test_a_generator_off_the_cpu_is_refused():
    class OnAnotherDevice:
        device = torch.device("meta")

    with pytest.raises(ValueError, match=r"^augment draws on a CPU generator \(its crop parameters are computed on the "
                                         r"CPU\)$"):
        augment(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), OnAnotherDevice(), (0.5, 1.0), False)


def test_images_on_another_device_are_augmented_there():
    """The crop parameters are drawn on the CPU, the warp runs where the images are (the meta device stands in for a
    GPU: a grid left on the CPU fails there as it would on CUDA)."""
    x = torch.zeros(2, 1, 8, 8, dtype=torch.uint8, device="meta")
    out = augment(x, torch.Generator().manual_seed(0), (0.5, 1.0), True)
    assert out.device.type == "meta" and out.shape == (2, 1, 8, 8) and out.dtype == torch.float32
