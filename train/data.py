"""Evaluation data: CIFAR-10/100 arrays, the ImageNet validation folder, and a user's own labelled images
(`--eval-data`: an .npz or an ImageFolder tree, any input size). Never used for training.

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

from core.errors import DFQFError, first_line
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


def _validate(x: np.ndarray, y: np.ndarray, num_classes: int, where: str, channels: int = 3) -> None:
    """Shapes, dtypes and label range of an image/label pair; anything else is a DFQFError."""
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != channels:
        raise DFQFError(f"{where}: x must be uint8 [N,H,W,{channels}], got {x.dtype} {list(x.shape)}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DFQFError(f"{where}: y must be integer [N], got {y.dtype} {list(y.shape)}")
    if len(x) != len(y):
        raise DFQFError(f"{where}: {len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise DFQFError(f"{where}: no images")
    if y.min() < 0 or y.max() >= num_classes:
        raise DFQFError(f"{where}: labels must lie in 0..{num_classes - 1}, got {y.min()}..{y.max()}")


EVAL_DATA_HELP = ("your own labelled images to evaluate on: an .npz (x uint8 [N,H,W,C], y) or an ImageFolder "
                  "tree (never used to train)")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
RESIZE = 256 / 224  # ImageFolder images: the shorter side resized to this × the input's longer side, then cropped


def read_eval_data(path: str | Path, input_size: Sequence[int], num_classes: int,
                   limit: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A user's own labelled images for a model with input [C, H, W]: uint8 [N,H,W,C] and int64 labels.

    `path` is an .npz (arrays `x` uint8 [N,H,W,C] at the model's size, `y` labels) or an ImageFolder tree
    (one folder per class, classes numbered in sorted folder order as torchvision does). Folder images are
    resized so that their shorter side is 256/224 of the input's longer side and center-cropped
    (torchvision's evaluation transform), unless they already have the input size. `limit` keeps a seeded random subset."""
    c, h, w = (int(v) for v in input_size)
    path = Path(path)
    if path.is_dir():
        x, y = _read_image_folder(path, c, h, w, limit, seed)
    elif path.is_file():
        x, y = _read_npz(path)
        if x.ndim == 4 and tuple(x.shape[1:3]) != (h, w):
            raise DFQFError(f"{path}: images are {x.shape[1]}x{x.shape[2]}, the model takes {h}x{w} "
                            "(an ImageFolder tree is resized; an .npz must match)")
    else:
        raise DFQFError(f"evaluation data not found: {path} (an .npz file or an ImageFolder folder)")
    _validate(x, y, num_classes, str(path), channels=c)
    if limit is not None:
        x, y = subset(x, y, limit, seed)
    return np.ascontiguousarray(x), y.astype(np.int64)


def _read_image_folder(root: Path, c: int, h: int, w: int, limit: int | None, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [(f, label) for label, name in enumerate(classes) for f in sorted((root / name).rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
    if not files:
        raise DFQFError(f"{root} holds no images in class folders (ImageFolder layout: {root}/<class>/<image>)")
    if limit is not None and limit < len(files):
        keep = np.sort(np.random.default_rng(seed).choice(len(files), size=limit, replace=False))
        files = [files[i] for i in keep]
    if c not in (1, 3):
        raise DFQFError(f"an ImageFolder tree gives 1- or 3-channel images; the model takes {c} channels")
    x = np.empty((len(files), h, w, c), np.uint8)
    for i, (f, _) in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB" if c == 3 else "L")
                if im.size != (w, h):  # torchvision's evaluation transform: Resize(side), CenterCrop(h, w)
                    im = TF.center_crop(TF.resize(im, round(max(h, w) * RESIZE)), [h, w])
                x[i] = np.asarray(im).reshape(h, w, c)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DFQFError(f"cannot read image {f}: {first_line(e)}") from None
    return x, np.array([label for _, label in files], np.int64)


def evaluation_data(dataset: str, input_size: Sequence[int], num_classes: int, data_dir: Path | None, split: str,
                    eval_data: str | Path | None, limit: int | None = None, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """The labelled images a command reports top-1 on: `eval_data` when given, else the teacher's CIFAR
    `dataset` split under `data_dir`, else None (no data folder, or a data set read elsewhere)."""
    if eval_data is not None:
        return read_eval_data(eval_data, input_size, num_classes, limit, seed)
    if data_dir is None or dataset not in NUM_CLASSES:
        return None
    x, y = load_split(data_dir, dataset, split)
    return subset(x, y, limit, seed) if limit is not None else (x, y)


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
