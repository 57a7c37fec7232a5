"""segprobe: digit canvases, the image/mask folder set, mean IoU, the dense linear probe and the node."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.datasets import Prepared
from pipeline.errors import PipelineError
from pipeline.evaluation import segmentation as seg


def fake_prepared(n_train=40, n_val=12, size=8, channels=1, seed=0):
    """Dark-background 'digits': a bright rectangle per image, labels 0..9."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.zeros((n, channels, size, size), dtype=torch.uint8)
        for i in range(n):
            r, c = torch.randint(0, size // 2, (2,), generator=g).tolist()
            x[i, :, r:r + size // 2, c:c + size // 2] = 255
        return x, torch.arange(n) % 10

    (tx, ty), (vx, vy) = split(n_train), split(n_val)
    return Prepared(tx, ty, vx, vy, [str(i) for i in range(10)], [0.2] * channels, [0.3] * channels, "fake")


# ---- digit canvases ------------------------------------------------------------------------------------

def test_canvases_are_deterministic_and_follow_the_split_seed():
    prep = fake_prepared()
    a, b, c = seg.digit_canvas(prep, 0), seg.digit_canvas(prep, 0), seg.digit_canvas(prep, 1)
    for name in ("train_x", "train_m", "val_x", "val_m"):
        assert getattr(a, name).numpy().tobytes() == getattr(b, name).numpy().tobytes()
    assert not torch.equal(a.train_x, c.train_x) and not torch.equal(a.val_m, c.val_m)
    assert a.train_x.shape == (10, 1, 8, 8) and a.train_m.shape == (10, 8, 8)      # 40 images / 4
    assert a.val_x.shape[0] == seg.MIN_CANVASES                                    # 12 / 4 = 3 -> at least 8
    assert a.num_classes == 11 and a.class_names[0] == "background"
    assert a.info["splits"]["train"] == {"canvases": 10, "from_images": 40} and a.info["threshold"] == 64
    assert int(a.train_m.max()) <= 10


def test_canvas_mask_on_a_hand_made_case():
    images = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    images[0] = 255                  # all foreground, class 3
    images[2, :, :, :2] = 255        # left half foreground, class 7 (image 1: all background, class 5)
    images[3] = 200                  # all foreground, class 1
    labels = torch.tensor([3, 5, 7, 1])
    x, m = seg.make_canvases(images, labels, np.array([[0, 1, 2, 3]]))
    assert m[0].tolist() == [[4, 4, 0, 0], [4, 4, 0, 0], [8, 0, 2, 2], [8, 0, 2, 2]]
    assert x[0, 0, :2, :2].eq(255).all() and x[0, 0, :2, 2:].eq(0).all() and x[0, 0, 2:, 2:].eq(200).all()
    _, whole = seg.make_canvases(images, labels, np.array([[0, 1, 2, 3]]), whole_quadrant=True)
    assert whole[0].tolist() == [[4, 4, 6, 6], [4, 4, 6, 6], [8, 8, 2, 2], [8, 8, 2, 2]]
    # the quadrants follow the index order
    _, swapped = seg.make_canvases(images, labels, np.array([[3, 2, 1, 0]]))
    assert swapped[0, 0, 0] == 2 and swapped[0, 3, 3] == 4


def test_bright_rgb_images_are_labelled_by_quadrant():
    prep = fake_prepared(channels=3)
    for split in ("train_x", "val_x"):
        getattr(prep, split)[:] = 160                   # no dark background
    canvases = seg.digit_canvas(prep, 0)
    assert canvases.info["threshold"] is None and int(canvases.train_m.min()) >= 1


# ---- metrics -------------------------------------------------------------------------------------------

def test_iou_of_hand_made_predictions():
    gt = torch.tensor([[0, 0, 1, 1, 255]])
    perfect, ious = seg.iou_scores(seg.confusion(torch.tensor([[0, 0, 1, 1, 2]]), gt, 3))
    assert perfect == {"miou": 1.0, "pixel_acc": 1.0} and ious == [1.0, 1.0, None]   # class 2 only where ignored
    partial, ious = seg.iou_scores(seg.confusion(torch.tensor([[0, 1, 1, 1, 0]]), gt, 3))
    assert ious[0] == pytest.approx(1 / 2) and ious[1] == pytest.approx(2 / 3) and ious[2] is None
    assert partial["miou"] == pytest.approx(7 / 12) and partial["pixel_acc"] == pytest.approx(3 / 4)
    # a class only predicted counts, with IoU 0
    wrong, ious = seg.iou_scores(seg.confusion(torch.tensor([[0, 0, 1, 2, 0]]), gt, 3))
    assert ious == [1.0, pytest.approx(1 / 2), 0.0] and wrong["miou"] == pytest.approx(1.5 / 3)


def test_upsampling_matches_bilinear_interpolation():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    up = seg.interpolation_matrix(4, 12).double()
    ref = F.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)
    assert torch.allclose(up @ x @ up.T, ref, atol=1e-6)
    # the training loss's pixel lattice is a subset of the same upsampled logits
    head = seg.SegHead(8, 3, 4, 12).eval()
    tokens, rows, cols = torch.randn(2, 16, 8), torch.tensor([1, 4, 7, 10]), torch.tensor([0, 3, 6, 9])
    assert torch.allclose(head(tokens, rows, cols), head(tokens)[:, :, rows][:, :, :, cols], atol=1e-6)
    assert seg.loss_stride(98, 7) == 3 and seg.loss_stride(8, 4) == 1 and seg.loss_stride(224, 14) == 4


# ---- the probe -----------------------------------------------------------------------------------------

def labelled_tokens(n, grid=4, patch=2, classes=3, dim=16, noise=0.5, seed=0):
    """Tokens (n, grid*grid, dim) = a class embedding of each patch's label + noise; masks constant per patch."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    labels = torch.randint(0, classes, (n, grid, grid), generator=g)
    tokens = centres[labels.view(n, -1)] + noise * torch.randn(n, grid * grid, dim, generator=g)
    masks = labels.repeat_interleave(patch, 1).repeat_interleave(patch, 2).to(torch.uint8)
    return tokens, masks


def test_probe_learns_labels_carried_by_the_tokens_and_is_deterministic():
    train_t, train_m = labelled_tokens(64)
    val_t, val_m = labelled_tokens(16, seed=1)
    args = (train_t, train_m, val_t, val_m, 3, 4, 5, 16, 1e-2, 1e-4, 0)
    metrics, ious, history, head = seg.train_probe(*args)
    again = seg.train_probe(*args)
    constant = seg.iou_scores(seg.confusion(torch.zeros_like(val_m), val_m, 3))[0]["miou"]
    assert constant < 0.2 and metrics["miou"] > 0.6 and metrics["pixel_acc"] > 0.75
    assert (metrics, ious, history) == again[:3]
    assert seg.train_probe(*args, stride=2)[0]["miou"] > 0.6       # the loss on a quarter of the pixels
    assert [h["epoch"] for h in history] == list(range(5)) and history[-1]["train_loss"] < history[0]["train_loss"]
    assert set(history[0]) == {"epoch", "train_loss", "val_miou"} and history[-1]["val_miou"] == metrics["miou"]
    pred = seg.predict(head, val_t[:2])
    assert pred.shape == (2, 8, 8) and pred.dtype == torch.uint8


def test_examples_figure_draws_ignored_pixels():
    """Ignored pixels (255) in white, each class in its own colour (background black), in ground truth and
    prediction alike."""
    images = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    gt = torch.full((2, 8, 8), 255, dtype=torch.uint8)
    gt[:, :2], gt[:, 2:4] = 0, 2
    pred = torch.zeros(2, 8, 8, dtype=torch.uint8)
    pred[:, :, 4:] = 1
    fig = seg.examples_figure(images, gt, pred, ["bg", "a", "b"], "t")
    assert len(fig.axes) == 6 and len(seg.class_colours(3)) == 4 and len(seg.class_colours(40)) == 41
    colours = seg.class_colours(3)
    assert colours[0] == (0.0, 0.0, 0.0) and colours[-1] == (1.0, 1.0, 1.0) and len(set(colours)) == 4
    for row in range(2):
        for col, classes in ((1, gt[row]), (2, pred[row])):
            image = fig.axes[3 * row + col].get_images()[0]
            drawn = torch.tensor(image.to_rgba(image.get_array())[..., :3])
            expected = torch.tensor([colours[3 if c == 255 else c] for c in classes.flatten().tolist()]).view(8, 8, 3)
            assert torch.allclose(drawn.float(), expected.float(), atol=1e-6), (row, col)


# ---- image/mask folders --------------------------------------------------------------------------------

DATA = {"img_size": 8, "channels": 1, "split_seed": 0, "val_fraction": 0.2}


def write_pairs(root, n=6, size=(12, 10), values=(0, 1, 2, 255)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / "images" / f"im{i}.png")
        mask = np.full((size[1], size[0]), values[i % len(values)], dtype=np.uint8)
        mask[:, : size[0] // 2] = 0
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    return root


def settings(path, num_classes=None):
    return {"path": str(path), "num_classes": num_classes}


def test_folder_dataset_reads_splits_and_counts_classes(tmp_path):
    root = write_pairs(tmp_path / "seg")
    ds = seg.folder_dataset(**settings(root), **DATA)
    assert ds.train_x.shape == (5, 1, 8, 8) and ds.val_x.shape == (1, 1, 8, 8) and ds.val_m.shape == (1, 8, 8)
    assert ds.num_classes == 3 and ds.info["pairs"] == 6 and ds.info["splits"]["val"] == {"images": 1}
    values = set(torch.cat([ds.train_m.flatten(), ds.val_m.flatten()]).tolist())
    assert values <= {0, 1, 2, 255} and {0, 255} <= values          # nearest resizing keeps the ids
    again = seg.folder_dataset(**settings(root), **DATA)
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.val_m, again.val_m)
    assert seg.folder_dataset(**settings(root, 5), **dict(DATA, channels=3)).num_classes == 5
    assert seg.folder_dataset(**settings(root), **dict(DATA, channels=3)).train_x.shape == (5, 3, 8, 8)


@pytest.mark.parametrize("case, message", [
    ("missing", "missing segmentation folder"),
    ("no_images", "holds no .png/.jpg images"),
    ("no_mask", "no mask"),
    ("size", "but its image"),
    ("range", "outside the classes [0, 2)"),
    ("rgb_mask", "single-channel"),
    ("one_class", "fewer than 2 classes"),
])
def test_folder_errors_are_one_line(tmp_path, case, message):
    root = tmp_path / "seg"
    num_classes = None
    if case == "no_images":
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
    elif case != "missing":
        write_pairs(root)
    if case == "no_mask":
        (root / "masks" / "im3.png").unlink()
    elif case == "size":
        Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(root / "masks" / "im2.png")
    elif case == "range":
        num_classes = 2                         # the masks hold 0, 1, 2 and 255: 2 is out of range
    elif case == "rgb_mask":
        Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(root / "masks" / "im1.png")
    elif case == "one_class":
        for mask in (root / "masks").iterdir():
            Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(mask)
    with pytest.raises(PipelineError, match=message.replace("[", r"\[").replace(")", r"\)")) as err:
        seg.folder_dataset(**settings(root, num_classes), **DATA)
    assert "\n" not in str(err.value)


# ---- the node ------------------------------------------------------------------------------------------

def test_node_end_to_end_on_the_tiny_preset(workdir, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.stages.evaluation import segprobe
    from pipeline.stages.training import prepare_data, random_init

    prepare_data.main(["--preset", "tiny"])
    random_init.main(["--preset", "tiny"])
    segprobe.main(["--preset", "tiny", "--seed", "0", "--weights", "random_init"])
    out = workdir / "results/seed0/segprobe/random_init"
    doc = json.loads((out / "metrics.json").read_text())
    assert (doc["protocol"] == "segprobe" and doc["settings"]["epochs"] == 2
            and set(doc["metrics"]) == {"miou", "pixel_acc"})
    assert doc["dataset"]["name"] == "digit_canvas" and doc["dataset"]["num_classes"] == 11
    assert (doc["weights"]["id"] == "random_init" and doc["weights"]["evaluated"] == "random"
            and doc["weights"]["sha256"])
    assert len(doc["per_class_iou"]) == 11 and [h["epoch"] for h in doc["history"]] == [0, 1]
    assert (0 <= doc["metrics"]["miou"] <= 1 and (out / "examples.png").stat().st_size > 0
            and (out / "params.yaml").is_file())

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs(client.get_experiment_by_name("tiny").experiment_id,
                                "tags.node = 'segprobe@seed0-random_init'")
    assert run.info.status == "FINISHED" and run.data.tags["chain"] == "random_init"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")] == [0, 1]
    assert run.data.metrics["miou"] == pytest.approx(doc["metrics"]["miou"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.json", "examples.png"}

    capsys.readouterr()
    for bad in (["--weights", "nope"], ["--weights", "mae"],
                ["--weights", "random_init", "--set", "segprobe.dataset=folder"],
                ["--weights", "random_init", "--set", "segprobe.num_classes=3"]):
        with pytest.raises(SystemExit) as exit_:
            segprobe.main(["--preset", "tiny", *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert not (workdir / "results/seed0/segprobe/mae").exists()
