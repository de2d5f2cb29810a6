"""Datasets as one `.npz` file each, loaded once into normalized tensors.

A dataset lives at ``<data root>/<name>.npz`` with arrays ``x_train, y_train, x_test, y_test``
(uint8 NHWC images, int64 labels). Where the file is missing, the torchvision dataset is
downloaded into the root and converted once, so every later load is a single read. ``digits``
(scikit-learn's bundled 8x8 digits) needs no file and no network. Any other `.npz` in the same
format is a custom dataset under its file name.

A file may also carry ``client_train`` and ``client_test``: an integer client id per sample of
``x_train`` and ``x_test`` (a writer, a speaker, a device), which `--partition natural` uses
(:mod:`pflbench.core.natural`); other partitions ignore them.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pflbench.atomic import save_npz
from pflbench.core.natural import NaturalClients
from pflbench.errors import UserError

ARRAYS = ("x_train", "y_train", "x_test", "y_test")
CLIENT_ARRAYS = ("client_train", "client_test")
DATA_ROOT_ENV = "PFLBENCH_DATA"


@dataclass(frozen=True)
class Dataset:
    """The merged pool of a dataset: normalized NCHW float images and labels, on one device."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    natural: NaturalClients | None = None  # the file's own client ids, where it carries them

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.y)


def _torchvision_arrays(split_builder: Callable[[bool], Any], images_nchw: bool = False,
                        transpose_hw: bool = False) -> Callable[[Path], dict[str, np.ndarray]]:
    """Download with torchvision and return the four arrays in the `.npz` format."""

    def fetch(root: Path) -> dict[str, np.ndarray]:
        arrays = {}
        for train, suffix in ((True, "train"), (False, "test")):
            ds = split_builder(root, train)
            x, y = to_npz_arrays(ds, images_nchw=images_nchw, transpose_hw=transpose_hw)
            arrays[f"x_{suffix}"], arrays[f"y_{suffix}"] = x, y
        return arrays

    return fetch


def to_npz_arrays(ds: Any, images_nchw: bool = False, transpose_hw: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of a torchvision dataset object as uint8 NHWC and int64 arrays."""
    x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels
    y = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    if x.ndim == 3:
        x = x[..., None]
    elif images_nchw:
        x = x.transpose(0, 2, 3, 1)
    if transpose_hw:
        x = x.transpose(0, 2, 1, 3)
    return np.ascontiguousarray(x, dtype=np.uint8), y


def _tv(cls_name: str, **kwargs: Any) -> Callable[[Path, bool], Any]:
    def build(root: Path, train: bool) -> Any:
        import torchvision.datasets as tvd

        if cls_name == "SVHN":
            return tvd.SVHN(str(root), split="train" if train else "test", download=True)
        return getattr(tvd, cls_name)(str(root), train=train, download=True, **kwargs)

    return build


DOWNLOADERS: dict[str, Callable[[Path], dict[str, np.ndarray]]] = {
    "mnist": _torchvision_arrays(_tv("MNIST")),
    "fmnist": _torchvision_arrays(_tv("FashionMNIST")),
    "emnist": _torchvision_arrays(_tv("EMNIST", split="byclass"), transpose_hw=True),
    "cifar10": _torchvision_arrays(_tv("CIFAR10")),
    "cifar100": _torchvision_arrays(_tv("CIFAR100")),
    "svhn": _torchvision_arrays(_tv("SVHN"), images_nchw=True),
}
BUILTIN_DATASETS = ("digits", *DOWNLOADERS)


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """`--data-root`, else the environment variable PFLBENCH_DATA, else ./datasets."""
    return Path(explicit or os.environ.get(DATA_ROOT_ENV) or "datasets")


def digits_arrays() -> dict[str, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 images), scaled to uint8; last 20% is the test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    cut = int(len(labels) * 0.8)
    return {"x_train": images[:cut], "y_train": labels[:cut], "x_test": images[cut:], "y_test": labels[cut:]}


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read and validate a dataset file; any defect is one UserError naming the file."""
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):  # a bare .npy array under an .npz name
            raise UserError(f"{path} holds a single array, not an .npz archive of "
                            f"{', '.join(ARRAYS)}")
        with f:
            missing = [k for k in ARRAYS if k not in f.files]
            if missing:
                raise UserError(f"{path} lacks array(s) {', '.join(missing)}; a dataset .npz needs "
                                f"{', '.join(ARRAYS)}")
            arrays = {k: f[k] for k in ARRAYS}
            arrays.update({k: f[k] for k in CLIENT_ARRAYS if k in f.files})
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise UserError(f"{path} is not a readable .npz ({type(exc).__name__}: {exc}); "
                        "delete it and download again, or rewrite it") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise UserError(f"{path}: x_{split} must be NHWC with one label per image "
                            f"(shapes {x.shape} and {y.shape})")
    _check_client_arrays(path, arrays)
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise UserError(f"{path}: x_train and x_test images differ in shape "
                        f"({arrays['x_train'].shape[1:]} and {arrays['x_test'].shape[1:]})")
    return arrays


def _check_client_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Client ids, where present, come as a pair with one integer per sample of their split."""
    present = [k for k in CLIENT_ARRAYS if k in arrays]
    if not present:
        return
    if len(present) == 1:
        missing = next(k for k in CLIENT_ARRAYS if k not in arrays)
        raise UserError(f"{path} has {present[0]} but not {missing}; a natural partition needs a client id "
                        "for every sample of both splits")
    for split in ("train", "test"):
        ids, y = arrays[f"client_{split}"], arrays[f"y_{split}"]
        if ids.shape != y.shape or not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"{path}: client_{split} must hold one integer client id per sample of "
                            f"x_{split} (shape {ids.shape}, dtype {ids.dtype}; expected {y.shape}, integers)")


def load_arrays(name: str, root: Path) -> dict[str, np.ndarray]:
    """The four arrays of a dataset, downloading and converting it once where needed."""
    path = root / f"{name}.npz"
    if path.exists():
        return read_npz(path)
    if name == "digits":
        return digits_arrays()
    if name not in DOWNLOADERS:
        raise UserError(f"unknown dataset '{name}': no file {path}; choose one of "
                        f"{', '.join(BUILTIN_DATASETS)} or put a {name}.npz in {root}")
    try:
        arrays = DOWNLOADERS[name](root / "raw")
    except Exception as exc:  # torchvision raises many kinds (URLError, RuntimeError, OSError)
        raise UserError(f"dataset '{name}' is not at {path} and could not be downloaded "
                        f"({type(exc).__name__}); put {name}.npz (arrays {', '.join(ARRAYS)}) "
                        f"in {root} or pass --data-root") from None
    save_npz(path, arrays)
    return arrays


def available_datasets(root: Path) -> list[str]:
    custom = ([p.stem for p in root.glob("*.npz") if not p.name.startswith(".")]  # skip temp files
              if root.is_dir() else [])
    return sorted(set(BUILTIN_DATASETS) | set(custom))


def normalize(images: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """uint8 NHWC -> float32 NCHW, standardized with the pool's own per-channel mean and std."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3), dtype=torch.float64)
    std = x.std(dim=(0, 2, 3)).double().clamp_min(1e-8)
    x.sub_(mean.float().view(1, -1, 1, 1)).div_(std.float().view(1, -1, 1, 1))
    return x.contiguous(), mean.numpy(), std.numpy()


def load_dataset(name: str, root: Path, device: torch.device | str = "cpu") -> Dataset:
    """The dataset's official train and test sets merged into one pool (the FedOBP/FL-bench protocol)."""
    arrays = load_arrays(name, root)
    images = np.concatenate([arrays["x_train"], arrays["x_test"]])
    labels = np.concatenate([arrays["y_train"], arrays["y_test"]]).astype(np.int64)
    if len(labels) == 0:
        raise UserError(f"dataset '{name}' has no samples")
    if labels.min() < 0:
        raise UserError(f"dataset '{name}' has negative labels; labels must be 0..C-1")
    x, _, _ = normalize(images)
    natural = None
    if "client_train" in arrays:
        ids = np.concatenate([arrays["client_train"], arrays["client_test"]]).astype(np.int64)
        natural = NaturalClients(ids=ids, is_test=np.arange(len(ids)) >= len(arrays["client_train"]))
    return Dataset(name=name, x=x.to(device), y=torch.from_numpy(labels).to(device),
                   num_classes=int(labels.max()) + 1, natural=natural)
