"""The data layer: .npz reading and validation, conversion of torchvision-style datasets,
download-once caching and the data root. All offline, on tiny generated arrays."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pflbench.core.data as data
from pflbench.core.data import (DATA_ROOT_ENV, available_datasets, data_root, load_arrays, load_dataset,
                           read_npz, to_npz_arrays)
from pflbench.errors import UserError


def make_arrays(n_train=12, n_test=6, hw=(5, 4), channels=3, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, *hw, channels), dtype=np.uint8),
        "y_train": (np.arange(n_train) % classes).astype(np.int64),
        "x_test": rng.integers(0, 256, (n_test, *hw, channels), dtype=np.uint8),
        "y_test": (np.arange(n_test) % classes).astype(np.int64),
    }


def assert_one_line_naming(exc_info, *fragments):
    message = str(exc_info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message


def no_temp_files(folder: Path) -> bool:
    return not any(".tmp" in p.name or p.name.startswith(".") for p in folder.iterdir())


# --- reading valid files ------------------------------------------------------------------------

def test_read_npz_and_load_arrays_round_trip(tmp_path):
    arrays = make_arrays()
    np.savez_compressed(tmp_path / "mnist.npz", **arrays)

    for got in (read_npz(tmp_path / "mnist.npz"), load_arrays("mnist", tmp_path)):
        assert set(got) == set(arrays)
        for key, value in arrays.items():
            assert got[key].dtype == value.dtype
            np.testing.assert_array_equal(got[key], value)


def test_load_dataset_merges_splits_and_normalizes_per_channel(tmp_path):
    arrays = make_arrays(n_train=20, n_test=7, hw=(6, 5), channels=3, classes=4)
    arrays["y_test"][-1] = 8  # a label seen only in the test split still counts
    np.savez(tmp_path / "cifar10.npz", **arrays)

    ds = load_dataset("cifar10", tmp_path)

    assert len(ds) == 27 and ds.x.shape == (27, 3, 6, 5)
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert ds.input_shape == (3, 6, 5)
    assert ds.num_classes == 9
    # train first, then test, in their original order
    np.testing.assert_array_equal(ds.y.numpy(), np.concatenate([arrays["y_train"], arrays["y_test"]]))
    mean = ds.x.mean(dim=(0, 2, 3))
    std = ds.x.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5)
    assert torch.allclose(std, torch.ones(3), atol=1e-4)
    # NHWC -> NCHW: the order of pixel values within one image's channel is preserved
    raw = np.concatenate([arrays["x_train"], arrays["x_test"]]).astype(np.float64)
    for c in range(3):
        plane = raw[..., c]
        expected = (plane / 255 - (plane / 255).mean()) / (plane / 255).std(ddof=1)
        np.testing.assert_allclose(ds.x[:, c].numpy(), expected, atol=1e-4)


def test_custom_dataset_is_loadable_and_listed(tmp_path):
    np.savez(tmp_path / "tiny.npz", **make_arrays(n_train=4, n_test=2, hw=(3, 3), channels=1, classes=2))
    (tmp_path / "notes.txt").write_text("not a dataset")

    ds = load_dataset("tiny", tmp_path)

    assert len(ds) == 6 and ds.input_shape == (1, 3, 3) and ds.num_classes == 2
    names = available_datasets(tmp_path)
    assert "tiny" in names and "notes" not in names
    assert set(data.BUILTIN_DATASETS) <= set(names)
    assert names == sorted(names)


def test_available_datasets_without_root_lists_builtins(tmp_path):
    assert available_datasets(tmp_path / "absent") == sorted(data.BUILTIN_DATASETS)


def test_available_datasets_ignores_leftover_temp_files(tmp_path):
    # what atomic_path leaves behind when the process is killed mid-write
    np.savez(tmp_path / ".cifar10.npz.abc123.tmp.npz", **make_arrays())
    assert available_datasets(tmp_path) == sorted(data.BUILTIN_DATASETS)


def test_digits_needs_no_file_and_no_network(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DOWNLOADERS", {})  # any download attempt would now fail loudly
    ds = load_dataset("digits", tmp_path / "empty-root")

    assert len(ds) == 1797 and ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    arrays = load_arrays("digits", tmp_path)
    assert arrays["x_train"].dtype == np.uint8 and arrays["x_train"].max() == 255
    assert len(arrays["y_train"]) + len(arrays["y_test"]) == 1797
    assert not (tmp_path / "digits.npz").exists()


# --- corrupt files ------------------------------------------------------------------------------

def _random_bytes(path):
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8).tobytes())


def _empty(path):
    path.write_bytes(b"")


def _missing_y_test(path):
    arrays = make_arrays()
    del arrays["y_test"]
    np.savez(path, **arrays)


def _fewer_labels_than_images(path):
    arrays = make_arrays()
    arrays["y_train"] = arrays["y_train"][:-1]
    np.savez(path, **arrays)


def _images_not_nhwc(path):
    arrays = make_arrays()
    arrays["x_test"] = arrays["x_test"][..., 0]
    np.savez(path, **arrays)


def _labels_not_flat(path):
    arrays = make_arrays()
    arrays["y_train"] = arrays["y_train"][:, None]
    np.savez(path, **arrays)


def _train_test_shapes_differ(path):
    arrays = make_arrays()
    arrays["x_test"] = make_arrays(hw=(7, 7))["x_test"]
    np.savez(path, **arrays)


def _plain_npy(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros((2, 3)))


def _truncated(path):
    np.savez_compressed(path, **make_arrays())
    path.write_bytes(path.read_bytes()[:-40])


def _corrupt_compressed_member(path):
    # a well-formed zip whose first member's deflate stream starts with an invalid block type
    np.savez_compressed(path, **make_arrays())
    raw = bytearray(path.read_bytes())
    name_len = int.from_bytes(raw[26:28], "little")
    extra_len = int.from_bytes(raw[28:30], "little")
    raw[30 + name_len + extra_len] = 0xFF  # BFINAL=1, BTYPE=11 (reserved): zlib.error
    path.write_bytes(bytes(raw))


def _pickled_object_array(path):
    arrays = make_arrays()
    arrays["y_test"] = np.array([{"a": 1}] * len(arrays["y_test"]), dtype=object)
    np.savez(path, **arrays)


CORRUPTIONS = [_random_bytes, _empty, _missing_y_test, _fewer_labels_than_images, _images_not_nhwc,
               _labels_not_flat, _train_test_shapes_differ, _plain_npy, _truncated,
               _corrupt_compressed_member, _pickled_object_array]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.lstrip("_"))
def test_corrupt_file_is_one_line_user_error_naming_it(tmp_path, corrupt, monkeypatch):
    def no_download(root):
        raise AssertionError("an existing file must never trigger a download")

    monkeypatch.setitem(data.DOWNLOADERS, "mnist", no_download)
    path = tmp_path / "mnist.npz"
    corrupt(path)

    with pytest.raises(UserError) as exc_info:
        read_npz(path)
    assert_one_line_naming(exc_info, path)
    with pytest.raises(UserError) as exc_info:
        load_dataset("mnist", tmp_path)
    assert_one_line_naming(exc_info, path)


def test_missing_arrays_are_named(tmp_path):
    arrays = make_arrays()
    del arrays["y_test"], arrays["x_train"]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError) as exc_info:
        read_npz(tmp_path / "bad.npz")
    assert_one_line_naming(exc_info, tmp_path / "bad.npz", "x_train", "y_test")


def test_negative_labels_are_a_user_error(tmp_path):
    arrays = make_arrays()
    arrays["y_train"][0] = -1
    np.savez(tmp_path / "neg.npz", **arrays)
    with pytest.raises(UserError, match="negative"):
        load_dataset("neg", tmp_path)


def test_empty_dataset_is_a_user_error(tmp_path):
    np.savez(tmp_path / "void.npz", **make_arrays(n_train=0, n_test=0))
    with pytest.raises(UserError, match="no samples"):
        load_dataset("void", tmp_path)


# --- missing files --------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [urllib.error.URLError("no network"), RuntimeError("bad md5"),
                                   OSError("disk full")], ids=lambda e: type(e).__name__)
def test_missing_builtin_offline_is_one_line_user_error_naming_the_file(tmp_path, monkeypatch, error):
    def offline(root):
        raise error

    monkeypatch.setitem(data.DOWNLOADERS, "cifar100", offline)
    with pytest.raises(UserError) as exc_info:
        load_arrays("cifar100", tmp_path)
    assert_one_line_naming(exc_info, tmp_path / "cifar100.npz", type(error).__name__)
    assert exc_info.value.__cause__ is None and exc_info.value.__suppress_context__
    assert not (tmp_path / "cifar100.npz").exists()
    assert no_temp_files(tmp_path)


def test_missing_builtin_offline_via_torchvision_builder(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class Offline:
        def __init__(self, root, *args, download=False, **kwargs):
            assert download and Path(root) == tmp_path / "raw"
            raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tvd, "CIFAR100", Offline)
    with pytest.raises(UserError) as exc_info:
        load_arrays("cifar100", tmp_path)
    assert_one_line_naming(exc_info, tmp_path / "cifar100.npz", "URLError")


def test_unknown_dataset_names_the_dataset(tmp_path):
    with pytest.raises(UserError) as exc_info:
        load_dataset("nosuchset", tmp_path)
    assert_one_line_naming(exc_info, "nosuchset", tmp_path / "nosuchset.npz")


# --- conversion of torchvision-style datasets ------------------------------------------------------

def test_to_npz_arrays_mnist_like_tensor_gets_a_channel_axis():
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    ds = SimpleNamespace(data=images, targets=torch.tensor([3, 1, 4, 1, 5]))

    x, y = to_npz_arrays(ds)

    assert x.shape == (5, 28, 28, 1) and x.dtype == np.uint8 and x.flags.c_contiguous
    np.testing.assert_array_equal(x[..., 0], images.numpy())
    assert y.dtype == np.int64 and y.tolist() == [3, 1, 4, 1, 5]


def test_to_npz_arrays_cifar_like_nhwc_array_is_unchanged():
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    ds = SimpleNamespace(data=images, targets=[9, 0, 2, 2])

    x, y = to_npz_arrays(ds)

    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x, images)
    assert y.dtype == np.int64 and y.tolist() == [9, 0, 2, 2]


def test_to_npz_arrays_svhn_like_nchw_with_labels_becomes_nhwc():
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    ds = SimpleNamespace(data=images, labels=np.array([1, 0, 7], dtype=np.int32))  # no .targets

    x, y = to_npz_arrays(ds, images_nchw=True)

    assert x.shape == (3, 32, 32, 3) and x.flags.c_contiguous
    np.testing.assert_array_equal(x, images.transpose(0, 2, 3, 1))
    assert x[2, 5, 6, 1] == images[2, 1, 5, 6]
    assert y.dtype == np.int64 and y.tolist() == [1, 0, 7]


def test_to_npz_arrays_emnist_transpose_hw_swaps_height_and_width():
    images = torch.randint(0, 256, (2, 28, 20), dtype=torch.uint8)  # non-square exposes the swap
    ds = SimpleNamespace(data=images, targets=torch.tensor([0, 61]))

    x, y = to_npz_arrays(ds, transpose_hw=True)

    assert x.shape == (2, 20, 28, 1) and x.flags.c_contiguous
    np.testing.assert_array_equal(x[..., 0], images.numpy().transpose(0, 2, 1))
    assert y.tolist() == [0, 61]


def test_torchvision_fetch_converts_both_splits(tmp_path):
    calls = []

    def builder(root, train):
        calls.append((root, train))
        n = 6 if train else 2
        return SimpleNamespace(data=torch.full((n, 4, 4), 7 if train else 9, dtype=torch.uint8),
                               targets=torch.arange(n))

    arrays = data._torchvision_arrays(builder)(tmp_path)

    assert calls == [(tmp_path, True), (tmp_path, False)]
    assert arrays["x_train"].shape == (6, 4, 4, 1) and (arrays["x_train"] == 7).all()
    assert arrays["x_test"].shape == (2, 4, 4, 1) and (arrays["x_test"] == 9).all()
    assert arrays["y_train"].tolist() == list(range(6)) and arrays["y_test"].tolist() == [0, 1]


# --- download once, then read -------------------------------------------------------------------

def test_download_is_converted_once_and_then_read_from_file(tmp_path, monkeypatch):
    arrays = make_arrays(channels=3)
    calls = []

    def fake_download(root):
        calls.append(root)
        return {k: v.copy() for k, v in arrays.items()}

    monkeypatch.setitem(data.DOWNLOADERS, "svhn", fake_download)
    root = tmp_path / "root"  # not created yet: the first load makes it

    first = load_arrays("svhn", root)
    assert calls == [root / "raw"]
    assert sorted(p.name for p in root.iterdir()) == ["svhn.npz"]  # no temp file left behind
    for key in arrays:
        np.testing.assert_array_equal(first[key], arrays[key])
        np.testing.assert_array_equal(read_npz(root / "svhn.npz")[key], arrays[key])

    second = load_arrays("svhn", root)
    ds = load_dataset("svhn", root)
    assert len(calls) == 1
    for key in arrays:
        np.testing.assert_array_equal(second[key], arrays[key])
    assert len(ds) == len(arrays["y_train"]) + len(arrays["y_test"])
    assert "svhn" in available_datasets(root)


def test_download_through_torchvision_builder_is_cached(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    built = []

    class FakeMNIST:
        def __init__(self, root, train=True, download=False):
            built.append((Path(root), train, download))
            n = 5 if train else 3
            self.data = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
            self.targets = torch.arange(n) % 10

    monkeypatch.setattr(tvd, "MNIST", FakeMNIST)

    ds = load_dataset("mnist", tmp_path)
    assert built == [(tmp_path / "raw", True, True), (tmp_path / "raw", False, True)]
    assert len(ds) == 8 and ds.input_shape == (1, 28, 28)
    assert (tmp_path / "mnist.npz").is_file() and no_temp_files(tmp_path)

    load_dataset("mnist", tmp_path)
    assert len(built) == 2


# --- data root -------------------------------------------------------------------------------------

def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    assert data_root() == Path("datasets")
    assert data_root(None) == Path("datasets")

    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "from-env"))
    assert data_root() == tmp_path / "from-env"

    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert data_root(str(tmp_path / "explicit")) == tmp_path / "explicit"


# --- real data (skipped where ../shared/data is absent) -----------------------------------------

@pytest.mark.shared_data
def test_shared_mnist_loads_as_merged_pool(shared_data_root):
    ds = load_dataset("mnist", shared_data_root)
    assert len(ds) == 70000
    assert ds.input_shape == (1, 28, 28)
    assert ds.num_classes == 10
    assert ds.x.dtype == torch.float32
    assert abs(float(ds.x.mean())) < 1e-3 and abs(float(ds.x.std()) - 1) < 1e-3
