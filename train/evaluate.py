"""Top-1 accuracy of a teacher on an evaluation split.

    python -m train.evaluate --arch resnet20 --weights W [--data-dir D] [--split test|train|lossless932]
    python -m train.evaluate --model mine.pt2 [--mean M --std S] --eval-data images.npz|FOLDER

Progress goes to stderr; the last stdout line is one JSON object (top1 in percent, n, arch, ...).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm

from core.cli import check_fields, cli_main, float_list, non_negative, one_of, option, parse_options, positive
from core.errors import DFQFError
from core.paths import resolve_data_dir

from .data import EVAL_DATA_HELP, SPLIT_FILES, image_batches, imagenet_val_loader, load_split, read_eval_data, subset
from .models import get_arch, load_teacher, resolve_weights
from .models.registry import MEAN_HELP, MODEL_HELP, STD_HELP, ArchInfo, teacher_arch

DATASETS = ("cifar10", "cifar100", "imagenet")
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def evaluate_top1(
    model: nn.Module, batches: Batches, device: str | torch.device = "cpu"
) -> tuple[float, int]:
    """(top-1 accuracy in percent, number of images) of `model` over (images, labels) batches.
    The model is moved to `device` and run in eval mode; its train/eval flag is restored afterwards."""
    was_training = model.training
    model.to(device).eval()
    correct = total = 0
    try:
        with torch.inference_mode():
            for images, labels in batches:
                logits = model(images.to(device))
                correct += int((logits.argmax(dim=1).cpu() == labels.cpu()).sum())
                total += int(labels.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise DFQFError("no images to evaluate")
    return 100.0 * correct / total, total


@dataclass(frozen=True)
class EvalOptions:
    """What `python -m train.evaluate` evaluates (each field is a flag)."""

    arch: str | None = option(None, "architecture name (see train.models.ARCHS)")
    weights: Path | None = option(None, "state_dict file (default: the arch's teacher in the data folder)")
    model: Path | None = option(None, MODEL_HELP)
    mean: list[float] | None = option(None, MEAN_HELP, parse=float_list)
    std: list[float] | None = option(None, STD_HELP, parse=float_list)
    eval_data: Path | None = option(None, EVAL_DATA_HELP)
    data_dir: Path | None = option(None, "data folder (default: $DFQF_DATA_DIR)")
    split: str = option("test", "evaluation split", check=one_of(*SPLIT_FILES))
    dataset: str | None = option(None, "data set (default: the arch's own)", check=one_of(*DATASETS))
    num_classes: int | None = option(None, "classifier outputs (default: the data set's)", check=positive)
    limit: int | None = option(None, "evaluate a seeded random subset of this many images", check=positive)
    seed: int = option(0, "seed of the --limit subset")
    batch_size: int = option(256, "images per batch", check=positive)
    workers: int = option(4, "ImageNet data-loader workers", check=non_negative)
    device: str = option("cpu", "torch device")

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.arch is None) == (self.model is None):
            raise DFQFError("pass one of --arch NAME and --model FILE.pt2")


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DFQFError(f"bad --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DFQFError(f"--device {name}: CUDA is not available on this machine")
    return device


def _dataset(info: ArchInfo, requested: str | None) -> str:
    dataset = requested or info.dataset
    if dataset not in DATASETS:
        raise DFQFError(f"{info.name} has no evaluation data set; pass --dataset {'|'.join(DATASETS)}")
    return dataset


def _weights(info: ArchInfo, weights: Path | None, data_dir: Path) -> Path | None:
    """--weights, else the arch's default teacher inside --data-dir, else registry resolution."""
    if weights is None and info.weights_file and (data_dir / info.weights_file).is_file():
        return data_dir / info.weights_file
    return resolve_weights(info.name, weights)


def _cifar_batches(args: EvalOptions, info: ArchInfo, data_dir: Path, dataset: str, num_classes: int
                   ) -> tuple[Batches, int]:
    """(batches, count) of a CIFAR split, checked against the arch's input size and class count."""
    x, y = load_split(data_dir, dataset, args.split)
    if args.limit is not None:
        x, y = subset(x, y, args.limit, args.seed)
    if tuple(x.shape[1:3]) != tuple(info.input_size[1:]):
        raise DFQFError(f"{info.name} expects {info.input_size[1]}x{info.input_size[2]} inputs, "
                        f"{dataset} images are {x.shape[1]}x{x.shape[2]}")
    if int(y.max()) >= num_classes:
        raise DFQFError(f"{dataset} has label {int(y.max())} but the model has {num_classes} classes")
    return image_batches(x, y, info.mean, info.std, args.batch_size), len(x)


def _imagenet_batches(args: EvalOptions, data_dir: Path) -> tuple[Batches, int]:
    """(batches, count) of the ImageNet validation folder: <D>/imagenet/val, <D>/val, or <D> itself."""
    if args.split != "test":
        raise DFQFError(f"imagenet supports only --split test (the validation set), not {args.split}")
    root = next((d for d in (data_dir / "imagenet" / "val", data_dir / "val") if d.is_dir()), data_dir)
    loader = imagenet_val_loader(root, args.batch_size, args.workers, args.limit, args.seed)
    return loader, len(loader.dataset)


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Evaluate --arch on --split and print the result as one JSON line."""
    args = parse_options(EvalOptions, argv, "python -m train.evaluate", __doc__.splitlines()[0])
    start = time.perf_counter()
    arch = teacher_arch(args.arch or "", args.weights, args.model, args.mean, args.std)  # --model registers one
    info = get_arch(arch)
    device = _device(args.device)
    if args.eval_data is not None:
        dataset, data_dir = str(args.eval_data), None
        num_classes = args.num_classes or info.num_classes
        x, y = read_eval_data(args.eval_data, info.input_size, num_classes, args.limit, args.seed)
        batches, count = image_batches(x, y, info.mean, info.std, args.batch_size), len(x)
    else:
        dataset = _dataset(info, args.dataset)
        data_dir = resolve_data_dir(args.data_dir)
        num_classes = args.num_classes or (100 if dataset == "cifar100" else info.num_classes)
        if dataset == "imagenet":
            batches, count = _imagenet_batches(args, data_dir)
        else:
            batches, count = _cifar_batches(args, info, data_dir, dataset, num_classes)
    if args.model is not None:
        weights = args.model
    else:
        weights = _weights(info, args.weights, data_dir) if data_dir else resolve_weights(arch, args.weights)
    model = load_teacher(arch, weights, num_classes)
    progress = tqdm(batches, total=-(-count // args.batch_size), desc=f"eval {arch}", unit="batch",
                    file=sys.stderr)
    top1, n = evaluate_top1(model, progress, device)
    result = {
        "top1": round(top1, 2), "n": n, "arch": arch, "dataset": dataset, "split": args.split,
        "weights": str(weights) if weights is not None else None, "num_classes": num_classes,
        "limit": args.limit, "device": str(device), "seconds": round(time.perf_counter() - start, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
