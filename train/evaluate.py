"""Top-1 accuracy of a teacher on an evaluation split.

    python -m train.evaluate --arch resnet20 --weights W [--data-dir D] [--split test|train|lossless932]

Progress goes to stderr; the last stdout line is one JSON object (top1 in percent, n, arch, ...).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm

from .data import SPLIT_FILES, image_batches, imagenet_val_loader, load_split, resolve_data_dir, subset
from .errors import CLIParser, DFQFError, cli_main, positive_int
from .models import get_arch, load_teacher, resolve_weights
from .models.registry import ArchInfo

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


def _parser() -> argparse.ArgumentParser:
    p = CLIParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--arch", required=True, help="architecture name (see train.models.ARCHS)")
    p.add_argument("--weights", help="state_dict file (default: the arch's teacher in the data folder)")
    p.add_argument("--data-dir", help="data folder (default: $DFQF_DATA_DIR)")
    p.add_argument("--split", default="test", choices=list(SPLIT_FILES), help="evaluation split (default: test)")
    p.add_argument("--dataset", choices=DATASETS, help="data set (default: the arch's own)")
    p.add_argument("--num-classes", type=positive_int, help="classifier outputs (default: the data set's)")
    p.add_argument("--limit", type=positive_int, help="evaluate a seeded random subset of this many images")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default: 0)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--workers", type=int, default=4, help="ImageNet data-loader workers (default: 4)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    return p


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


def _weights(info: ArchInfo, weights: str | None, data_dir: Path) -> Path | None:
    """--weights, else the arch's default teacher inside --data-dir, else registry resolution."""
    if weights is None and info.weights_file and (data_dir / info.weights_file).is_file():
        return data_dir / info.weights_file
    return resolve_weights(info.name, weights)


def _cifar_batches(args: argparse.Namespace, info: ArchInfo, data_dir: Path, dataset: str, num_classes: int
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


def _imagenet_batches(args: argparse.Namespace, data_dir: Path) -> tuple[Batches, int]:
    """(batches, count) of the ImageNet validation folder: <D>/imagenet/val, <D>/val, or <D> itself."""
    if args.split != "test":
        raise DFQFError(f"imagenet supports only --split test (the validation set), not {args.split}")
    root = next((d for d in (data_dir / "imagenet" / "val", data_dir / "val") if d.is_dir()), data_dir)
    loader = imagenet_val_loader(root, args.batch_size, args.workers, args.limit, args.seed)
    return loader, len(loader.dataset)


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Evaluate --arch on --split and print the result as one JSON line."""
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    info = get_arch(args.arch)
    dataset = _dataset(info, args.dataset)
    device = _device(args.device)
    data_dir = resolve_data_dir(args.data_dir)
    num_classes = args.num_classes or (100 if dataset == "cifar100" else info.num_classes)
    if dataset == "imagenet":
        batches, count = _imagenet_batches(args, data_dir)
    else:
        batches, count = _cifar_batches(args, info, data_dir, dataset, num_classes)
    weights = _weights(info, args.weights, data_dir)
    model = load_teacher(args.arch, weights, num_classes)
    progress = tqdm(batches, total=-(-count // args.batch_size), desc=f"eval {args.arch}", unit="batch",
                    file=sys.stderr)
    top1, n = evaluate_top1(model, progress, device)
    result = {
        "top1": round(top1, 2), "n": n, "arch": args.arch, "dataset": dataset, "split": args.split,
        "weights": str(weights) if weights is not None else None, "num_classes": num_classes,
        "limit": args.limit, "device": str(device), "seconds": round(time.perf_counter() - start, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
