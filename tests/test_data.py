"""Data layer: every loader on small files in the real on-disk formats, discovery, error messages,
augmentation and batching, the ``data`` CLI, and Fashion-MNIST on the real Debian files."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.engine import data as data_mod
from benchmark.engine.data import tensors as data_tensors
from benchmark.__main__ import main

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_debian_fashion = pytest.mark.skipif(not (DEBIAN_FASHION / "train-labels-idx1-ubyte.gz").is_file(),
                                          reason="Debian package dataset-fashion-mnist not installed")
IDX_STEMS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}


@pytest.fixture(autouse=True)
def isolated_discovery(tmp_path, monkeypatch):
    """Each test searches only what it writes (plus system locations): no $BENCHMARK_DATA, and
    ./data is inside tmp_path."""
    monkeypatch.delenv(data_mod.ENV_VAR, raising=False)
    monkeypatch.delenv(data_mod.CACHE_ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)


def system_locations_at(monkeypatch, folder: Path) -> None:
    """Make ``folder`` every dataset's only system location (as /usr/share/datasets/... is for
    Fashion-MNIST on Debian), so that "installed system-wide" and "missing" are both real here."""
    for name, spec in list(data_mod.DATASETS.items()):
        monkeypatch.setitem(data_mod.DATASETS, name, dataclasses.replace(spec, system_dirs=(str(folder),)))


# --------------------------------------------------------------------------------------------
# Writers of the real formats
# --------------------------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_mnist_like(folder: Path, gz: bool = True, n_train: int = 12, n_test: int = 7, seed: int = 0,
                     first_train_labels=None) -> dict:
    """Random 28x28 digits with pixel (0, 0) of the first train image set to 255."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 200, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 200, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays["train-images-idx3-ubyte"][0, 0, 0] = 255
    if first_train_labels is not None:
        arrays["train-labels-idx1-ubyte"][:len(first_train_labels)] = first_train_labels
    paths = {stem: write_idx(folder / stem, array, gz) for stem, array in arrays.items()}
    return {"arrays": arrays, "paths": paths}


def cifar_pickle(batch: dict) -> bytes:
    """A protocol-2 pickle naming ``numpy.core`` as the official (Python 2 era) files do."""
    return pickle.dumps(batch, protocol=2).replace(b"numpy._core.", b"numpy.core.")


def cifar_rows(n: int, rng) -> np.ndarray:
    rows = rng.integers(0, 200, (n, 3072), dtype=np.uint8)
    rows[0, :] = 0
    rows[0, 1024 + 1] = 255  # green channel, row 0, column 1 of the first image
    return rows


def write_cifar10(folder: Path, per_batch: int = 4, n_test: int = 5) -> dict:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    for i in range(1, 6):
        y = rng.integers(0, 10, per_batch).tolist()
        labels[f"data_batch_{i}"] = y
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": y,
                 b"data": cifar_rows(per_batch, rng), b"filenames": [b"img.png"] * per_batch}
        (folder / f"data_batch_{i}").write_bytes(cifar_pickle(batch))
    y = rng.integers(0, 10, n_test).tolist()
    labels["test_batch"] = y
    (folder / "test_batch").write_bytes(cifar_pickle(
        {b"batch_label": b"testing batch 1 of 1", b"labels": y, b"data": cifar_rows(n_test, rng),
         b"filenames": [b"img.png"] * n_test}))
    (folder / "batches.meta").write_bytes(cifar_pickle({b"label_names": [b"airplane"] * 10}))
    return labels


def write_cifar100(folder: Path, n_train: int = 9, n_test: int = 4) -> dict:
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n).tolist()
        fine[0] = 99
        labels[split] = fine
        (folder / split).write_bytes(cifar_pickle(
            {b"filenames": [b"img.png"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
             b"coarse_labels": [19 - f % 20 for f in fine], b"data": cifar_rows(n, rng)}))
    (folder / "meta").write_bytes(cifar_pickle({b"fine_label_names": [b"apple"] * 100}))
    return labels


def write_jpeg(path: Path, colour, size=64) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(path, "JPEG", quality=95)
    return path


TINY_WNIDS = ["n01443537", "n01629819", "n01641577"]
TINY_COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]  # one solid colour per class


def write_tiny_imagenet(folder: Path, per_class: int = 2) -> list[tuple[str, int]]:
    """The official layout; returns the val (file, label) pairs in annotation order."""
    (folder / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (folder / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in TINY_WNIDS))
    for wnid, colour in zip(TINY_WNIDS, TINY_COLOURS):
        for i in range(per_class):
            write_jpeg(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", colour)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text(
            "".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class)))
    val = [("val_0.JPEG", 2), ("val_1.JPEG", 0), ("val_2.JPEG", 1), ("val_3.JPEG", 2)]
    lines = []
    for name, label in val:
        write_jpeg(folder / "val" / "images" / name, TINY_COLOURS[label])
        lines.append(f"{name}\t{TINY_WNIDS[label]}\t0\t0\t63\t63\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    (folder / "test" / "images").mkdir(parents=True)  # the official unlabelled test images: unused
    return val


def normalized(value: float, spec, channel: int = 0) -> float:
    return (value / 255 - spec.mean[channel]) / spec.std[channel]


# --------------------------------------------------------------------------------------------
# Loaders of all six datasets
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "kmnist"])
def test_mnist_family_loads_idx_files(tmp_path, name, gz, layout):
    root = tmp_path / "root"
    folder = root if layout == "flat" else root / TORCHVISION_FOLDER[name] / "raw"
    written = write_mnist_like(folder, gz=gz)
    data = data_mod.load(name, root)
    spec = data_mod.get_spec(name)
    assert data.source == folder
    assert data.train.x.shape == (12, 1, 28, 28) and data.test.x.shape == (7, 1, 28, 28)
    assert data.train.x.dtype == torch.float32 and data.train.y.dtype == torch.int64
    assert data.train.y.tolist() == written["arrays"]["train-labels-idx1-ubyte"].tolist()
    assert data.test.y.tolist() == written["arrays"]["t10k-labels-idx1-ubyte"].tolist()
    assert data.train.x[0, 0, 0, 0].item() == pytest.approx(normalized(255, spec))
    raw = written["arrays"]["t10k-images-idx3-ubyte"][3, 5, 7]
    assert data.test.x[3, 0, 5, 7].item() == pytest.approx(normalized(raw, spec), abs=1e-5)
    assert spec.num_classes == 10 and spec.shape == (1, 28, 28) and not spec.augment


def test_limit_keeps_the_first_examples_of_each_split(tmp_path):
    written = write_mnist_like(tmp_path / "d", n_train=12, n_test=7)
    data = data_mod.load("mnist", tmp_path / "d", limit=5)
    assert len(data.train) == 5 and len(data.test) == 5
    assert data.train.y.tolist() == written["arrays"]["train-labels-idx1-ubyte"][:5].tolist()


def test_cifar10_loads_python_batches(tmp_path):
    labels = write_cifar10(tmp_path / "root" / "cifar-10-batches-py", per_batch=4, n_test=5)
    data = data_mod.load("cifar10", tmp_path / "root")
    spec = data.spec
    assert data.source == tmp_path / "root" / "cifar-10-batches-py"
    assert data.train.x.shape == (20, 3, 32, 32) and data.test.x.shape == (5, 3, 32, 32)
    assert data.train.x.dtype == torch.float32 and data.train.y.dtype == torch.int64
    assert data.train.y.tolist() == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    assert data.test.y.tolist() == labels["test_batch"]
    # Rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    first = data.train.x[0]
    assert first[1, 0, 1].item() == pytest.approx(normalized(255, spec, 1))
    assert first[0, 0, 1].item() == pytest.approx(normalized(0, spec, 0))
    assert first[1, 1, 0].item() == pytest.approx(normalized(0, spec, 1))
    assert data.train.x[4, 1, 0, 1].item() == pytest.approx(normalized(255, spec, 1))  # batch 2's first
    assert spec.num_classes == 10 and spec.augment


def test_cifar100_uses_fine_labels(tmp_path):
    labels = write_cifar100(tmp_path / "flat", n_train=9, n_test=4)
    data = data_mod.load("cifar100", tmp_path / "flat")
    assert data.train.x.shape == (9, 3, 32, 32) and data.test.x.shape == (4, 3, 32, 32)
    assert data.train.y.tolist() == labels["train"] and data.test.y.tolist() == labels["test"]
    assert data.train.y[0].item() == 99 and data.spec.num_classes == 100
    assert data.test.x[0, 1, 0, 1].item() == pytest.approx(normalized(255, data.spec, 1))


def test_tiny_imagenet_reads_the_official_layout(tmp_path):
    val = write_tiny_imagenet(tmp_path / "root" / "tiny-imagenet-200", per_class=2)
    data = data_mod.load("tiny-imagenet", tmp_path / "root")
    spec = data.spec
    assert spec.num_classes == 200 and spec.shape == (3, 64, 64)
    assert data.train.x.shape == (6, 3, 64, 64) and data.test.x.shape == (4, 3, 64, 64)
    assert data.train.x.dtype == torch.float32 and data.train.y.dtype == torch.int64
    assert data.train.y.tolist() == [0, 1, 2, 0, 1, 2]  # classes interleaved: a prefix covers all
    assert data.test.y.tolist() == [label for _, label in val]  # val is the test split
    for x, y in ((data.train.x, data.train.y), (data.test.x, data.test.y)):
        for image, label in zip(x, y.tolist()):
            for channel, value in enumerate(TINY_COLOURS[label]):
                assert image[channel, 32, 32].item() == pytest.approx(normalized(value, spec, channel),
                                                                      abs=4 / 255 / spec.std[channel])


def test_tiny_imagenet_caches_decoded_arrays(tmp_path):
    folder = tmp_path / "tiny-imagenet-200"
    write_tiny_imagenet(folder)
    first = data_mod.load("tiny-imagenet", tmp_path)
    caches = sorted(folder.glob(".decoded-*.npz"))
    assert [c.name.split("-")[1] for c in caches] == ["test", "train"]
    # The cache, not the JPEGs, is what a second load reads: plant a marker pixel in it.
    train_cache = next(c for c in caches if "-train-" in c.name)
    with np.load(train_cache) as npz:
        x, y = npz["x"].copy(), npz["y"]
    x[0, 0, 0, 0] = 255
    np.savez(train_cache, x=x, y=y)
    second = data_mod.load("tiny-imagenet", tmp_path)
    assert second.train.x[0, 0, 0, 0].item() == pytest.approx(normalized(255, second.spec))
    torch.testing.assert_close(second.test.x, first.test.x)
    # A broken cache is not an error: the JPEGs are decoded again.
    train_cache.write_bytes(b"PK\x03\x04 truncated")
    third = data_mod.load("tiny-imagenet", tmp_path)
    torch.testing.assert_close(third.train.x, first.train.x)


def test_large_splits_stay_uint8_and_normalize_per_batch(tmp_path, monkeypatch):
    write_mnist_like(tmp_path / "d")
    as_float = data_mod.load("mnist", tmp_path / "d")
    monkeypatch.setattr(data_tensors, "UINT8_ABOVE_BYTES", 0)
    as_uint8 = data_mod.load("mnist", tmp_path / "d")
    assert as_uint8.train.x.dtype == torch.uint8
    index = torch.tensor([3, 0, 5])
    x, y = as_uint8.train.take(index)
    torch.testing.assert_close(x, as_float.train.x[index])
    assert y.tolist() == as_float.train.y[index].tolist()


# --------------------------------------------------------------------------------------------
# Fashion-MNIST on the real Debian files
# --------------------------------------------------------------------------------------------

@needs_debian_fashion
def test_real_fashion_mnist_from_debian():
    data = data_mod.load("fashion-mnist")  # found through the system location alone
    assert data.source == DEBIAN_FASHION
    assert data.train.x.shape == (60000, 1, 28, 28) and data.test.x.shape == (10000, 1, 28, 28)
    assert sorted(data.train.y.unique().tolist()) == list(range(10))
    assert torch.bincount(data.train.y).tolist() == [6000] * 10
    spec = data.spec
    pixels = data.train.x * spec.std[0] + spec.mean[0]  # undo the normalization
    assert pixels.mean().item() == pytest.approx(0.2860, abs=5e-4)
    assert pixels.std().item() == pytest.approx(0.3530, abs=5e-4)
    assert data.train.x.mean().item() == pytest.approx(0.0, abs=2e-3)
    assert data.train.y[:5].tolist() == [9, 0, 0, 3, 0]


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------

def test_discovery_order_data_dir_then_env_then_local_data(tmp_path, monkeypatch):
    explicit, env_root, local = tmp_path / "explicit", tmp_path / "env", tmp_path / "data"
    write_mnist_like(explicit, seed=1)
    write_mnist_like(env_root / "MNIST" / "raw", seed=2)
    write_mnist_like(local / "mnist", seed=3)
    monkeypatch.setenv(data_mod.ENV_VAR, str(env_root))
    assert data_mod.locate("mnist", explicit) == explicit
    assert data_mod.locate("mnist") == env_root / "MNIST" / "raw"
    assert data_mod.locate("mnist", tmp_path / "empty") == env_root / "MNIST" / "raw"
    monkeypatch.delenv(data_mod.ENV_VAR)
    assert data_mod.locate("mnist") == local / "mnist"
    # load reads what locate found: the labels differ between the three copies
    expected = write_mnist_like(tmp_path / "again", seed=1)["arrays"]["train-labels-idx1-ubyte"]
    assert data_mod.load("mnist", explicit).train.y.tolist() == expected.tolist()


def test_system_location_comes_after_local_data(tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    write_mnist_like(system, first_train_labels=[9, 0, 0, 3, 0, 2, 7, 2, 5, 5])  # Fashion-MNIST's first labels
    system_locations_at(monkeypatch, system)
    assert data_mod.locate("fashion-mnist") == system
    write_mnist_like(tmp_path / "data")
    assert data_mod.locate("fashion-mnist") == tmp_path / "data"


def test_a_flat_folder_of_another_dataset_is_not_served(tmp_path):
    """The three MNIST-like datasets share file names; known label prefixes tell them apart."""
    write_mnist_like(tmp_path / "flat", first_train_labels=[9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
    assert data_mod.locate("fashion-mnist", tmp_path / "flat") == tmp_path / "flat"
    with pytest.raises(data_mod.DatasetMissing, match="holds fashion-mnist, not mnist"):
        data_mod.locate("mnist", tmp_path / "flat")
    with pytest.raises(data_mod.DatasetMissing, match="holds fashion-mnist, not kmnist"):
        data_mod.locate("kmnist", tmp_path / "flat")


@pytest.mark.parametrize("name", list(data_mod.DATASETS))
def test_missing_dataset_names_every_place_and_the_fetch_command(tmp_path, monkeypatch, name):
    system_locations_at(monkeypatch, tmp_path / "system")  # nothing installed system-wide
    monkeypatch.setenv(data_mod.ENV_VAR, str(tmp_path / "env"))
    (tmp_path / "explicit").mkdir()
    write_mnist_like(tmp_path / "explicit" / "partial", gz=True)
    for path in (tmp_path / "explicit" / "partial").iterdir():
        if path.name.startswith("t10k-labels"):
            path.unlink()
    searched_root = tmp_path / "explicit" / "partial"
    with pytest.raises(data_mod.DatasetMissing) as caught:
        data_mod.load(name, searched_root)
    message = str(caught.value)
    places = data_mod.candidate_folders(name, searched_root)
    assert searched_root in places[0].parents and places[-2:] == [tmp_path / "data", tmp_path / "system"]
    for place in places:
        assert str(place) in message
    assert str(tmp_path / "env") in message and str(tmp_path / "data") in message
    assert repr(name) in message and message.count("not found") == 1
    assert data_mod.fetch_command(name, searched_root) in message
    assert f"python -m benchmark data fetch {name} --data-dir {searched_root}" in message
    if name in ("mnist", "kmnist"):  # the partial flat folder: says what it lacks
        assert "no t10k-labels-idx1-ubyte[.gz]" in message


def test_missing_fashion_mnist_suggests_the_debian_package(tmp_path, monkeypatch):
    system_locations_at(monkeypatch, tmp_path / "system")
    with pytest.raises(data_mod.DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        data_mod.locate("fashion-mnist", tmp_path)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="cifar100"):
        data_mod.get_spec("cifar1000")


# --------------------------------------------------------------------------------------------
# Corrupt and truncated files
# --------------------------------------------------------------------------------------------

def corrupt_idx(folder: Path, how: str) -> Path:
    """Write a valid MNIST folder, then break one file; return the broken file."""
    gz = how.startswith("gz")
    paths = write_mnist_like(folder, gz=gz)["paths"]
    images, labels = paths["train-images-idx3-ubyte"], paths["train-labels-idx1-ubyte"]
    if how == "gz cut short":
        raw = images.read_bytes()
        images.write_bytes(raw[: len(raw) // 2])
    elif how == "gz bad crc":
        raw = bytearray(images.read_bytes())
        raw[-8] ^= 0xFF
        images.write_bytes(bytes(raw))
    elif how == "gz bad deflate stream":
        raw = bytearray(images.read_bytes())
        raw[20:60] = b"\xff" * 40
        images.write_bytes(bytes(raw))
    elif how == "gz not gzip":
        images.write_bytes(b"this is not a gzip file at all" * 10)
    elif how == "wrong magic":
        images.write_bytes(b"\x00\x00\x0d\x03" + images.read_bytes()[4:])
    elif how == "labels as images":
        images.write_bytes(labels.read_bytes())
    elif how == "header size mismatch":
        images.write_bytes(images.read_bytes()[:-100])
    elif how == "cut inside header":
        images.write_bytes(images.read_bytes()[:9])
    elif how == "empty":
        images.write_bytes(b"")
    elif how == "counts differ":
        labels.write_bytes(idx_bytes(np.zeros(11, np.uint8)))
        return labels
    elif how == "label out of range":
        labels.write_bytes(idx_bytes(np.full(12, 10, np.uint8)))
        return labels
    return images


@pytest.mark.parametrize("how", ["gz cut short", "gz bad crc", "gz bad deflate stream", "gz not gzip", "wrong magic", "labels as images",
                                 "header size mismatch", "cut inside header", "empty", "counts differ",
                                 "label out of range"])
def test_corrupt_idx_file_is_named(tmp_path, how):
    broken = corrupt_idx(tmp_path / "d", how)
    with pytest.raises(data_mod.DatasetCorrupt) as caught:
        data_mod.load("mnist", tmp_path / "d")
    assert str(broken) in str(caught.value)


class _RunsCode:
    """A pickle payload that would create a folder if the loader executed it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("how", ["cut short", "garbage", "not a dict", "no labels", "wrong row size",
                                 "float data", "runs code"])
def test_corrupt_cifar_batch_is_named(tmp_path, how):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    broken = folder / "data_batch_3"
    rng = np.random.default_rng(0)
    marker = tmp_path / "code-ran"
    if how == "cut short":
        broken.write_bytes(broken.read_bytes()[:5000])
    elif how == "garbage":
        broken.write_bytes(os.urandom(4000))
    elif how == "not a dict":
        broken.write_bytes(cifar_pickle([1, 2, 3]))
    elif how == "no labels":
        broken.write_bytes(cifar_pickle({b"data": cifar_rows(4, rng)}))
    elif how == "wrong row size":
        broken.write_bytes(cifar_pickle({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}))
    elif how == "float data":
        broken.write_bytes(cifar_pickle({b"data": np.zeros((4, 3072)), b"labels": [0] * 4}))
    elif how == "runs code":
        broken.write_bytes(pickle.dumps({b"data": _RunsCode(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(data_mod.DatasetCorrupt) as caught:
        data_mod.load("cifar10", tmp_path)
    assert str(broken) in str(caught.value)
    assert not marker.exists()


def test_cifar100_label_out_of_range_is_named(tmp_path):
    write_cifar100(tmp_path / "c")
    bad = tmp_path / "c" / "test"
    bad.write_bytes(cifar_pickle({b"data": cifar_rows(2, np.random.default_rng(0)), b"fine_labels": [3, 100]}))
    with pytest.raises(data_mod.DatasetCorrupt, match="outside 0..99") as caught:
        data_mod.load("cifar100", tmp_path / "c")
    assert str(bad) in str(caught.value)


@pytest.mark.parametrize("how", ["truncated jpeg", "not an image", "wrong size", "missing val image",
                                 "unknown wnid", "missing class folder"])
def test_corrupt_tiny_imagenet_is_named(tmp_path, how):
    folder = tmp_path / "tiny-imagenet-200"
    write_tiny_imagenet(folder)
    broken = folder / "val" / "images" / "val_2.JPEG"
    if how == "truncated jpeg":
        broken = folder / "train" / TINY_WNIDS[1] / "images" / f"{TINY_WNIDS[1]}_1.JPEG"
        broken.write_bytes(broken.read_bytes()[:300])
    elif how == "not an image":
        broken.write_bytes(b"<html>404 not found</html>")
    elif how == "wrong size":
        write_jpeg(broken, (1, 2, 3), size=32)
    elif how == "missing val image":
        broken.unlink()
    elif how == "unknown wnid":
        broken = folder / "val" / "val_annotations.txt"
        broken.write_text(broken.read_text() + "val_9.JPEG\tn99999999\t0\t0\t1\t1\n")
    elif how == "missing class folder":
        broken = folder / "train" / TINY_WNIDS[2] / "images"
        for image in broken.iterdir():
            image.unlink()
        broken.rmdir()
    with pytest.raises(data_mod.DatasetCorrupt) as caught:
        data_mod.load("tiny-imagenet", tmp_path)
    assert str(broken) in str(caught.value)


# --------------------------------------------------------------------------------------------
# Augmentation and batching
# --------------------------------------------------------------------------------------------

def reference_crop_flip(image: torch.Tensor, padding: int, dy: int, dx: int, flip: bool) -> torch.Tensor:
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    crop = padded[:, dy:dy + h, dx:dx + w]
    return crop.flip(-1) if flip else crop


def test_augment_is_a_zero_padded_crop_plus_optional_flip():
    padding = 2
    image = torch.arange(2 * 5 * 6, dtype=torch.float32).view(2, 5, 6) + 1  # non-square, no zeros
    batch = image.expand(1000, -1, -1, -1).clone()
    out = data_mod.augment(batch, torch.Generator().manual_seed(0), padding=padding)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    assert torch.equal(batch[0], image)  # the input is not modified
    options = {(dy, dx, flip): reference_crop_flip(image, padding, dy, dx, flip)
               for dy in range(2 * padding + 1) for dx in range(2 * padding + 1) for flip in (False, True)}
    seen = set()
    for sample in out:
        match = [key for key, expected in options.items() if torch.equal(sample, expected)]
        assert len(match) == 1, "every output is exactly one crop/flip of the zero-padded input"
        seen.add(match[0])
    assert seen == set(options)  # every offset and both flips occur
    assert torch.equal(options[(padding, padding, False)], image)  # centre crop, no flip: unchanged
    assert torch.equal(options[(padding, padding, True)], image.flip(-1))  # flip reverses the width axis


def test_augment_without_padding_only_flips_and_is_seeded():
    batch = torch.randn(64, 3, 4, 4)
    out = data_mod.augment(batch, torch.Generator().manual_seed(5), padding=0)
    flipped = [torch.equal(o, x.flip(-1)) for o, x in zip(out, batch)]
    kept = [torch.equal(o, x) for o, x in zip(out, batch)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    again = data_mod.augment(batch, torch.Generator().manual_seed(5), padding=0)
    assert torch.equal(out, again)


def labelled_split(n: int) -> data_mod.Split:
    """x[i] is filled with i and y[i] == i, so a batch shows which examples it holds."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    return data_mod.Split(x, torch.arange(n), torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))


def epoch_labels(split, seed, epoch, **kw) -> list[list[int]]:
    return [y.tolist() for _, y in data_mod.batches(split, 10, data_mod.epoch_generator(seed, epoch), **kw)]


def test_batches_are_slices_of_one_permutation():
    split = labelled_split(103)
    got = epoch_labels(split, 0, 0)
    assert [len(b) for b in got] == [10] * 10 + [3]
    assert sorted(sum(got, [])) == list(range(103)) and sum(got, []) != list(range(103))
    for x, y in data_mod.batches(split, 10, data_mod.epoch_generator(0, 0)):
        assert torch.equal(x[:, 0, 0, 0], y.float())  # images travel with their labels
    dropped = epoch_labels(split, 0, 0, drop_last=True)
    assert [len(b) for b in dropped] == [10] * 10 and dropped == got[:10]
    assert sum(epoch_labels(split, 0, 0, shuffle=False), []) == list(range(103))


def test_same_seed_and_epoch_give_the_same_batches():
    split = labelled_split(50)
    assert epoch_labels(split, 3, 7) == epoch_labels(split, 3, 7)
    assert epoch_labels(split, 3, 7) != epoch_labels(split, 3, 8)
    assert epoch_labels(split, 3, 7) != epoch_labels(split, 4, 7)
    def augmented():
        return [x for x, _ in data_mod.batches(split, 10, data_mod.epoch_generator(1, 2), augment_batches=True)]

    first, second = augmented(), augmented()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    plain = [x for x, _ in data_mod.batches(split, 10, data_mod.epoch_generator(1, 2))]
    assert any(not torch.equal(a, p) for a, p in zip(first, plain))


# --------------------------------------------------------------------------------------------
# The data CLI
# --------------------------------------------------------------------------------------------

@needs_debian_fashion
def test_cli_check_finds_debian_fashion_mnist(capsys):
    assert main(["data", "check", "fashion-mnist"]) == 0
    assert str(DEBIAN_FASHION) in capsys.readouterr().out


def test_cli_check_missing_dataset_exits_1(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "check", "mnist", "--data-dir", str(empty)]) == 1
    err = capsys.readouterr().err
    assert str(empty / "MNIST" / "raw") in err and data_mod.fetch_command("mnist", empty) in err


def test_cli_check_verify_reports_a_corrupt_file(tmp_path, capsys):
    broken = corrupt_idx(tmp_path / "d", "gz cut short")
    assert main(["data", "check", "mnist", "--data-dir", str(tmp_path / "d")]) == 0  # files are there
    assert main(["data", "check", "mnist", "--verify", "--data-dir", str(tmp_path / "d")]) == 1
    assert str(broken) in capsys.readouterr().err


def test_cli_fetch_does_not_download_what_is_present(tmp_path, capsys):
    write_mnist_like(tmp_path / "d" / "MNIST" / "raw")
    assert main(["data", "fetch", "mnist", "--data-dir", str(tmp_path / "d")]) == 0
    assert str(tmp_path / "d" / "MNIST" / "raw") in capsys.readouterr().out


def test_batches_pad_with_black_like_torchvision_randomcrop():
    """Padding holds the normalized value of a black pixel (0 before normalization), per channel."""
    mean, std = torch.tensor([0.5, 0.25]).view(1, 2, 1, 1), torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    x = torch.full((64, 2, 4, 4), 3.0)  # a constant normalized image
    split = data_mod.Split(x, torch.zeros(64, dtype=torch.long), mean, std)
    [(out, _)] = list(data_mod.batches(split, 64, torch.Generator().manual_seed(0), augment_batches=True))
    values = set(out[:, 0].unique().tolist()) | set(out[:, 1].unique().tolist())
    assert values == {3.0, -1.0, -0.5}  # the image, and (0 - mean) / std of each channel
    assert set(out[:, 0].unique().tolist()) == {3.0, -1.0}
