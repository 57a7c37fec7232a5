"""pipeline.data.datasets' readers, each against its docstring: an image folder's train and val tensors both mapped
from files in scratch, and the CIFAR reader's Python 2 pickles (the real files: str keys read as bytes), class names
of either kind, and its one-line errors naming the file and what is wrong with it. Tiny inputs."""
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from pipeline.data import datasets
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
