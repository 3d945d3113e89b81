"""DFQF's Python API: your own trained CNN in, an integer model for this machine out — no training data.

    import dfqf
    student = dfqf.quantize(model, "runs/mine", input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    artifact = dfqf.compile(student, "runs/mine/llvm")
    logits = dfqf.load(artifact).predict(pixels)  # uint8 [N, H, W, C]

`quantize` exports `model` with `torch.export` to OUT/teacher.pt2 and runs the same job as
`python -m train.dfqf --model OUT/teacher.pt2` (or, with `method=` a PTQ baseline, `python -m train.ptq`); every
option of those commands is a keyword (`wbits=8, abits=8, g_steps=..., smoke=True, eval_data=...`). A model the
converters cannot read is one `DFQFError` naming its op and listing the supported ones.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from core.errors import DFQFError
from core.files import atomic_write
from lower.compile import CompileOptions, compile_student
from runtime.model import IntegerModel
from runtime.model import load as load_artifact
from train.models.registry import EXPORTED_PROGRAMS, module_arch
from train.ptq import METHODS as PTQ_TABLE

MODEL_FILE_NAME = "teacher.pt2"  # where quantize() saves an nn.Module's export, inside OUT

PTQ_METHODS = tuple(PTQ_TABLE)  # train.ptq's methods

__all__ = ["DFQFError", "compile", "export", "load", "quantize"]


def export(model: nn.Module, path: str | Path, input_size: Sequence[int]) -> Path:
    """`model` (in eval mode) exported by `torch.export` on a [1, *input_size] input and saved to `path` (.pt2),
    checked to be readable by the converters; the file `--model` takes."""
    info = module_arch(model, input_size)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, "wb", lambda f: f.write(EXPORTED_PROGRAMS[info.name]))
    except OSError as e:
        raise DFQFError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def quantize(model: nn.Module | str | Path, out: str | Path, input_size: Sequence[int] | None = None,
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None, method: str = "dfqf",
             **options: Any) -> Path:
    """Quantize `model` (an nn.Module, or a .pt2 file) without data; returns OUT/student.pt.

    input_size: [C, H, W] of an nn.Module's input (a .pt2 file records its own); mean/std: the input
    normalization the model was trained with (default ImageNet's); method: "dfqf" (`train.dfqf`) or a PTQ
    baseline of `train.ptq` (minmax, dfq, zeroq, recon, real-calib); options: the fields of
    `train.dfqf_config.DFQFConfig` or `train.ptq.PTQOptions` (e.g. wbits=4, abits=4, eval_data="val.npz")."""
    out = Path(out)
    if isinstance(model, nn.Module):
        if input_size is None:
            raise DFQFError("quantize(model): pass input_size=(C, H, W) of the model's input")
        model = export(model, out / MODEL_FILE_NAME, input_size)
    elif input_size is not None:
        raise DFQFError("input_size is read from the .pt2 file; pass it only with an nn.Module")
    fields = {"model": str(model), "out": str(out),
              "mean": list(mean) if mean is not None else None, "std": list(std) if std is not None else None}
    if method == "dfqf":
        from train.dfqf import train_dfqf
        from train.dfqf_config import SMOKE, DFQFConfig

        train_dfqf(_options(DFQFConfig, fields, {**(SMOKE if options.get("smoke") else {}), **options}))
    elif method in PTQ_METHODS:
        from train.ptq import PTQOptions, run

        run(_options(PTQOptions, {**fields, "method": method}, options))
    else:
        raise DFQFError(f"unknown method {method!r}; supported: dfqf, {', '.join(PTQ_METHODS)}")
    return out / "student.pt"


def _options(cls: type, fields: dict[str, Any], options: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DFQFError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}")
    taken = sorted(set(options) & set(fields))
    if taken:
        raise DFQFError(f"{', '.join(taken)}: pass as quantize()'s own argument(s)")
    return cls(**fields, **options)


def compile(student: str | Path, out: str | Path, target: str = "llvm", **options: Any) -> Path:  # noqa: A001
    """Lower `student` (student.pt) to an integer artifact folder `out` for `target` (llvm: this CPU, or cuda);
    options: the fields of `lower.compile.CompileOptions` (force=True, mcpu=..., onnx=False, ...)."""
    compile_student(_options(CompileOptions, {"student": Path(student), "target": target, "out": Path(out)},
                             options))
    return Path(out)


def load(artifact: str | Path, device: str | None = None) -> IntegerModel:
    """The compiled integer model of `artifact`: `.predict(uint8 [N, H, W, C]) -> float32 logits`."""
    return load_artifact(artifact, device)
