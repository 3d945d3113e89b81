"""Evaluation data: CIFAR-10/100 arrays and the ImageNet validation folder (never used for training).

CIFAR splits are read from `<data_dir>/<dataset>/<file>.npz` (keys `x` uint8 [N,H,W,3] HWC RGB and
`y` integer labels [N], see shared/data/README.md); when that file is absent, torchvision's own
`cifar-10-batches-py` / `cifar-100-python` folders under the data dir are used instead.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from core.errors import DFQFError
from core.pixels import normalize

from .models.registry import IMAGENET_MEAN, IMAGENET_STD

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
# split name -> npz file name inside <data_dir>/<dataset>/
SPLIT_FILES = {"test": "test.npz", "train": "train.npz", "lossless932": "test_lossless932.npz"}
TORCHVISION_SPLITS = ("test", "train")  # splits torchvision's CIFAR datasets can provide


def load_split(
    data_dir: str | Path, dataset: str, split: str, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N,H,W,3] and labels int64 [N] of `dataset` ("cifar10" | "cifar100") `split`
    ("test" | "train" | "lossless932", the latter cifar10 only). Rows may be sorted by class."""
    _check_split(dataset, split)
    root = Path(data_dir)
    npz = root / dataset / SPLIT_FILES[split]
    if npz.is_file():
        x, y = _read_npz(npz)
        where = str(npz)
    else:
        x, y = _read_torchvision(root, dataset, split, download, looked_for=npz)
        where = f"torchvision {dataset} {split} data in {root}"
    _validate(x, y, NUM_CLASSES[dataset], where)
    return np.ascontiguousarray(x), y.astype(np.int64)


def _check_split(dataset: str, split: str) -> None:
    if dataset not in NUM_CLASSES:
        raise DFQFError(f"unknown data set {dataset!r}; supported: {', '.join(NUM_CLASSES)}")
    if split not in SPLIT_FILES:
        raise DFQFError(f"unknown split {split!r}; supported: {', '.join(SPLIT_FILES)}")
    if split == "lossless932" and dataset != "cifar10":
        raise DFQFError("split lossless932 exists only for cifar10")


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Arrays `x` and `y` of an .npz file; unreadable files and missing keys are DFQFErrors."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise DFQFError(f"{path} lacks array(s) {', '.join(missing)} (has: {', '.join(f.files) or 'none'})")
            return f["x"], f["y"]
    except DFQFError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DFQFError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None


def _read_torchvision(
    root: Path, dataset: str, split: str, download: bool, looked_for: Path
) -> tuple[np.ndarray, np.ndarray]:
    """The split from torchvision's CIFAR folder format under `root` (downloaded there if allowed)."""
    if split not in TORCHVISION_SPLITS:
        raise DFQFError(f"{looked_for} not found (split {split} has no torchvision equivalent)")
    import torchvision

    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        ds = cls(root=str(root), train=split == "train", download=download)
    except Exception as e:  # torchvision raises RuntimeError for missing/corrupt folders, URLError offline
        folder = root / cls.base_folder
        raise DFQFError(
            f"no {dataset} {split} data: neither {looked_for} nor torchvision's {folder} could be read "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        ) from None
    return np.asarray(ds.data), np.asarray(ds.targets)


def _validate(x: np.ndarray, y: np.ndarray, num_classes: int, where: str) -> None:
    """Shapes, dtypes and label range of an image/label pair; anything else is a DFQFError."""
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise DFQFError(f"{where}: x must be uint8 [N,H,W,3], got {x.dtype} {list(x.shape)}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DFQFError(f"{where}: y must be integer [N], got {y.dtype} {list(y.shape)}")
    if len(x) != len(y):
        raise DFQFError(f"{where}: {len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise DFQFError(f"{where}: no images")
    if y.min() < 0 or y.max() >= num_classes:
        raise DFQFError(f"{where}: labels must lie in 0..{num_classes - 1}, got {y.min()}..{y.max()}")


def image_batches(
    x: np.ndarray, y: np.ndarray, mean: Sequence[float], std: Sequence[float], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(normalised float NCHW images, int64 labels) in order, `batch_size` rows at a time."""
    if batch_size <= 0:
        raise DFQFError(f"batch size must be positive, got {batch_size}")
    for start in range(0, len(x), batch_size):
        stop = start + batch_size
        yield normalize(x[start:stop], mean, std).contiguous(), torch.as_tensor(np.asarray(y[start:stop]), dtype=torch.int64)


def subset(x: np.ndarray, y: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset of `n` rows (kept in their original order); all rows if n >= N.
    Data files are sorted by class, so taking the first n rows would be biased."""
    if n <= 0:
        raise DFQFError(f"subset size must be positive, got {n}")
    if n >= len(x):
        return x, y
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
    return x[idx], y[idx]


def imagenet_val_loader(
    root: str | Path, batch_size: int, workers: int, limit: int | None = None, seed: int = 0
) -> torch.utils.data.DataLoader:
    """ImageNet validation images from an ImageFolder tree (one folder per class), with the standard
    torchvision eval transform: Resize(256), CenterCrop(224), ToTensor, Normalize(ImageNet stats).
    `limit` keeps a seeded random subset of that many images."""
    from torchvision import datasets, transforms

    root = Path(root)
    if not root.is_dir():
        raise DFQFError(f"ImageNet validation folder not found: {root}")
    tf = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    try:
        ds: torch.utils.data.Dataset = datasets.ImageFolder(str(root), transform=tf)
    except (FileNotFoundError, OSError) as e:
        raise DFQFError(f"{root} is not an ImageFolder tree of class folders: {str(e).splitlines()[0][:200]}") from None
    if limit is not None and limit < len(ds):
        idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=limit, replace=False))
        ds = torch.utils.data.Subset(ds, idx.tolist())
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
