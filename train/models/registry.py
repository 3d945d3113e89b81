"""Architecture registry: how to build each teacher, its input contract, and where its weights live."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from core.errors import DFQFError, first_line
from core.files import load_torch_file
from core.paths import cache_dir, data_dir_from_env

from .cifar_resnet import CifarResNet
from .tiny import TinyNet

CIFAR_MEAN = (0.485, 0.456, 0.406)  # the public CIFAR ResNet teachers were trained with ImageNet stats
CIFAR_STD = (0.229, 0.224, 0.225)
IMAGENET_MEAN, IMAGENET_STD = CIFAR_MEAN, CIFAR_STD
AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


@dataclass(frozen=True)
class ArchInfo:
    """Everything the toolchain needs to know about an architecture besides its weights."""

    name: str
    build: Callable[[int], nn.Module]  # num_classes -> model with random weights
    dataset: str  # default evaluation data set: cifar10 | imagenet | synthetic
    num_classes: int
    input_size: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights_file: str | None = None  # default weights, relative to $DFQF_DATA_DIR
    weights_url: str | None = None  # public download for users with internet


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    return build


def _cifar(depth: int) -> Callable[[int], nn.Module]:
    return lambda num_classes: CifarResNet(depth, num_classes)


ARCHS: dict[str, ArchInfo] = {
    info.name: info
    for info in [
        ArchInfo("resnet20", _cifar(20), "cifar10", 10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD,
                 "teachers/resnet20_cifar10.pt", AKAMASTER + "resnet20-12fca82f.th"),
        ArchInfo("resnet32", _cifar(32), "cifar10", 10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD,
                 None, AKAMASTER + "resnet32-d509ac18.th"),
        ArchInfo("resnet44", _cifar(44), "cifar10", 10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD,
                 None, AKAMASTER + "resnet44-014dd654.th"),
        ArchInfo("resnet56", _cifar(56), "cifar10", 10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD,
                 "teachers/resnet56_cifar10.pt", AKAMASTER + "resnet56-4bfd9763.th"),
        ArchInfo("resnet110", _cifar(110), "cifar10", 10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD,
                 None, AKAMASTER + "resnet110-1d1ed7c2.th"),
        ArchInfo("resnet18", _torchvision("resnet18"), "imagenet", 1000, (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD,
                 None, "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
        ArchInfo("resnet50", _torchvision("resnet50"), "imagenet", 1000, (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD,
                 None, "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
        ArchInfo("mobilenet_v2", _torchvision("mobilenet_v2"), "imagenet", 1000, (3, 224, 224), IMAGENET_MEAN,
                 IMAGENET_STD, None, "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"),
        ArchInfo("tinynet", lambda num_classes: TinyNet(num_classes), "synthetic", 10, (3, 16, 16), CIFAR_MEAN,
                 CIFAR_STD),
    ]
}


MODEL_HELP = "your own teacher instead of --arch: a torch.export.save file (.pt2)"
MEAN_HELP = "--model's input normalization, mean per channel, e.g. 0.5,0.5,0.5 (default ImageNet's)"
STD_HELP = "--model's input normalization, std per channel (default ImageNet's)"
EXPORTED = "pt2:"  # prefix of the architecture name of a user's exported model (then its sha256)
EXPORTED_PROGRAMS: dict[str, bytes] = {}  # registered exported architectures: their torch.export.save bytes


def register_exported(program: bytes, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      origin: str = "the exported model") -> ArchInfo:
    """Register the model serialized by `torch.export.save` in `program` as an architecture, named after its
    sha256 (a student records which model it came from, and carries `program` to rebuild it). Its input size
    and class count are read from the program; the normalization is `mean`/`std` (default ImageNet's)."""
    import hashlib
    import io

    from .exported import load_exported

    name = EXPORTED + hashlib.sha256(program).hexdigest()[:16]  # = exported_name(its file)
    model = load_exported(io.BytesIO(program), origin)
    shape = tuple(model.meta["input_shape"])
    if len(shape) != 4:
        raise DFQFError(f"{origin}: the model's input must be [N, C, H, W] images, not {list(shape)}")
    with torch.no_grad():
        out = model(torch.zeros(1, *shape[1:]))
    if out.ndim != 2:
        raise DFQFError(f"{origin}: the model must return [N, classes] logits, not {list(out.shape)}")
    mean, std = tuple(map(float, mean or IMAGENET_MEAN)), tuple(map(float, std or IMAGENET_STD))
    if len(mean) != shape[1] or len(std) != shape[1] or min(std) <= 0:
        raise DFQFError(f"--mean/--std need {shape[1]} values each (std > 0), got {list(mean)} / {list(std)}")
    classes = int(out.shape[1])

    def build(num_classes: int) -> nn.Module:
        if num_classes != classes:
            raise DFQFError(f"{origin} has {classes} classes, not {num_classes}")
        return load_exported(io.BytesIO(program), origin)

    info = ArchInfo(name, build, "custom", classes, shape[1:], mean, std)
    ARCHS[name] = info
    EXPORTED_PROGRAMS[name] = program
    return info


def exported_name(path: Path) -> str | None:
    """The architecture name the .pt2 file `path` registers as (None if it cannot be read)."""
    from core.files import sha256_file

    try:
        return EXPORTED + sha256_file(path)[:16]
    except OSError:
        return None


def exported_arch(path: str | Path, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                  ) -> ArchInfo:
    """Register the model saved with `torch.export.save` in `path` (see `register_exported`)."""
    path = Path(path)
    try:
        program = path.read_bytes()
    except OSError as e:
        raise DFQFError(f"cannot read the model file {path}: {e.strerror or e}") from None
    return register_exported(program, mean, std, str(path))


def module_arch(model: nn.Module, input_size: Sequence[int], mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> ArchInfo:
    """Register an nn.Module of the user's code: exported by `torch.export` on a [1, *input_size] input."""
    import io

    example = torch.zeros(1, *map(int, input_size))
    try:
        program = torch.export.export(model.eval(), (example,))
    except Exception as e:  # noqa: BLE001 - data-dependent control flow, unsupported Python, wrong input size
        raise DFQFError(f"torch.export cannot export the model on a {list(example.shape)} input: "
                        f"{first_line(e)}") from None
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return register_exported(buf.getvalue(), mean, std, f"model {type(model).__name__}")


def teacher_arch(arch: str, weights: str | Path | None, model: str | Path | None,
                 mean: Sequence[float] | None, std: Sequence[float] | None) -> str:
    """The architecture a command runs on: `arch` from the registry, or the user's `model` file (.pt2,
    registered; its weights are inside it)."""
    if model is None:
        if mean is not None or std is not None:
            raise DFQFError(f"--mean/--std describe a --model's input; {arch} has its own")
        return arch
    if weights is not None:
        raise DFQFError("--weights and --model exclude each other: the .pt2 file holds its weights")
    return exported_arch(model, mean, std).name


def get_arch(name: str) -> ArchInfo:
    if name.startswith(EXPORTED) and name not in ARCHS:
        raise DFQFError(f"architecture {name} is a user's exported model that is not loaded: pass --model FILE")
    if name not in ARCHS:
        known = ", ".join(a for a in ARCHS if not a.startswith(EXPORTED))
        raise DFQFError(f"unknown architecture {name!r}; supported: {known}")
    return ARCHS[name]


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
    info = get_arch(name)
    return info.build(num_classes or info.num_classes)


def resolve_weights(arch: str, weights: str | Path | None) -> Path | None:
    """The weights file to load: the given path, else the arch's default from $DFQF_DATA_DIR or the
    download cache, else a download (with internet). `tinynet` has seeded weights: returns None."""
    info = get_arch(arch)
    if weights is not None:
        p = Path(weights)
        if not p.is_file():
            raise DFQFError(f"weights file not found: {p}")
        return p
    if info.weights_file is None and info.weights_url is None:
        return None
    data_dir = data_dir_from_env()
    if data_dir is not None and info.weights_file and (data_dir / info.weights_file).is_file():
        return data_dir / info.weights_file
    assert info.weights_url is not None
    cached = cache_dir() / "teachers" / Path(info.weights_url).name
    if cached.is_file():
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(info.weights_url, str(cached), progress=False)
    except Exception as e:  # offline machines land here
        raise DFQFError(
            f"no weights for {arch}: download of {info.weights_url} failed ({type(e).__name__}); "
            f"pass --weights PATH or set DFQF_DATA_DIR to a folder with {info.weights_file or 'the weights'}"
        ) from None
    return cached


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state_dict saved by torch.save (plain, or wrapped as {'state_dict': ...} with 'module.')."""
    obj: Any = load_torch_file(path, "weights file")
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DFQFError(f"weights file {path} does not hold a state_dict (a dict of tensors)")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    check_finite(state, f"weights file {path}")
    return state


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Every floating-point tensor of `state` is finite, else a DFQFError naming the first that is not."""
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise DFQFError(f"{what}: tensor {k} holds {bad} NaN/inf value(s)")


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True), with mismatches reported as one readable DFQFError."""
    expected = model.state_dict()
    # checkpoints without num_batches_tracked still describe the model completely
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {_few(shapes)}")
        raise DFQFError(f"{what} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


def _few(items: list[str], n: int = 4) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


def load_teacher(arch: str, weights: str | Path | None = None, num_classes: int | None = None) -> nn.Module:
    """Build `arch`, load its weights strictly, and return it in eval mode. An exported model holds its own
    weights: `weights` may then only name its .pt2 file again."""
    if arch in EXPORTED_PROGRAMS:
        if weights is not None and exported_name(Path(weights)) != arch:
            raise DFQFError(f"{weights} is not the model of {arch} (a user's exported model carries its weights)")
        return build_model(arch, num_classes).eval()
    model = build_model(arch, num_classes)
    path = resolve_weights(arch, weights)
    if path is not None:
        load_state_dict_strict(model, read_state_dict(path), f"weights file {path} for --arch {arch}")
    return model.eval()
