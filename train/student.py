"""The `student.pt` contract (DESIGN §5): everything lower.compile needs to rebuild a student exactly.

A plain dict (loads with torch.load(weights_only=True)):
  format        "dfqf.student", version 1
  arch          registry name; arch_kwargs {"num_classes": K}
  input         {"size": [C, H, W], "mean": [...], "std": [...]} — normalization the student expects
  quant_config  QuantConfig as a dict (wbits, abits, first_last_bits, overrides, residual_bits, protocol:
                "integer", or "paper" for the fake-quant-only paper protocol, BN unfolded; absent: integer)
  quantizers    {name: {"kind": "weight"|"activation", "spec": QuantSpec dict,
                        "scale": float32 tensor, "zero_point": int32 tensor}}
                weight quantizers are named after their conv/linear module, activation ones '<node>_aq'
  state_dict    the fake-quant student's state_dict (BN folded: every conv/linear has a bias; the paper
                protocol keeps the BN layers and their running statistics)
  method        what produced it ("minmax", "dfq", "zeroq", "real-calib", "dfqf"); data_free: bool
  meta          free-form provenance (teacher file and sha256, versions, time)
  model         only for a user's exported model (arch "pt2:<sha256[:16]>"): {"format": "torch.export",
                "program": uint8 tensor of the torch.export.save bytes} — the student rebuilds without the file
The student graph is rebuilt deterministically: build(arch) → fold BN (integer protocol) →
quantize_model(quant_config), then state_dict is loaded strictly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from core.errors import DFQFError, first_line
from core.files import atomic_torch_save, load_torch_file

from .models import build_model, get_arch
from .models.registry import EXPORTED, EXPORTED_PROGRAMS, check_finite, load_state_dict_strict, register_exported
from .quant.convert import QuantConfig, quantize_model
from .quant.modules import ActQuantizer, WeightQuantizer
from .quant.spec import QuantSpec

FORMAT, VERSION = "dfqf.student", 1


def quantizer_table(student: nn.Module) -> dict[str, dict[str, Any]]:
    table = {}
    for name, m in student.named_modules():
        if isinstance(m, (ActQuantizer, WeightQuantizer)):
            key = name.removesuffix(".weight_quantizer") if isinstance(m, WeightQuantizer) else name
            table[key] = {
                "kind": "weight" if isinstance(m, WeightQuantizer) else "activation",
                "spec": m.spec.to_dict(),
                "scale": m.scale.detach().cpu().clone(),
                "zero_point": m.zero_point.detach().cpu().clone(),
            }
    return table


def save_student(path: Path, student: fx.GraphModule, arch: str, num_classes: int, config: QuantConfig,
                 method: str, data_free: bool, meta: dict[str, Any] | None = None) -> None:
    info = get_arch(arch)
    model = {}
    if arch in EXPORTED_PROGRAMS:
        program = torch.frombuffer(bytearray(EXPORTED_PROGRAMS[arch]), dtype=torch.uint8)
        model = {"model": {"format": "torch.export", "program": program}}
    atomic_torch_save({
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "arch_kwargs": {"num_classes": num_classes},
        "input": {"size": list(info.input_size), "mean": list(info.mean), "std": list(info.std)},
        "quant_config": config.to_dict(),
        "quantizers": quantizer_table(student),
        "state_dict": {k: v.detach().cpu() for k, v in student.state_dict().items()},
        "method": method,
        "data_free": data_free,
        "meta": json.loads(json.dumps(meta or {})),  # plain JSON types only, so weights_only loads work
        **model,
    }, path)


def read_student(path: Path) -> dict[str, Any]:
    """The raw checkpoint dict, validated (format, version, required keys)."""
    path = Path(path)
    ckpt = load_torch_file(path, "student file")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise DFQFError(f"{path} is not a DFQF student checkpoint (format {FORMAT!r})")
    if ckpt.get("version") != VERSION:
        raise DFQFError(f"{path}: unsupported student version {ckpt.get('version')!r} (expected {VERSION})")
    missing = [k for k in ("arch", "arch_kwargs", "quant_config", "quantizers", "state_dict") if k not in ckpt]
    if missing:
        raise DFQFError(f"{path}: student checkpoint lacks {missing}")
    if isinstance(ckpt["arch"], str) and ckpt["arch"].startswith(EXPORTED):
        register_model(path, ckpt)
    return ckpt


def register_model(path: Path, ckpt: dict[str, Any]) -> None:
    """Register the user's exported model a student carries, under the architecture name it records."""
    model, inputs = ckpt.get("model"), ckpt.get("input")
    if not (isinstance(model, dict) and model.get("format") == "torch.export"
            and isinstance(model.get("program"), torch.Tensor) and model["program"].dtype == torch.uint8):
        raise DFQFError(f"{path}: the student of an exported model ({ckpt['arch']}) lacks its program")
    if not (isinstance(inputs, dict) and isinstance(inputs.get("mean"), list) and isinstance(inputs.get("std"), list)):
        raise DFQFError(f"{path}: the student's input record is malformed")
    info = register_exported(model["program"].numpy().tobytes(), inputs["mean"], inputs["std"],
                             f"the model inside {path}")
    if info.name != ckpt["arch"]:
        raise DFQFError(f"{path}: its model's sha256 does not match its architecture {ckpt['arch']} "
                        f"(the file was altered)")


def load_student(path: Path) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Rebuild the fake-quant student from `student.pt`; returns (student in eval mode, checkpoint dict)."""
    ckpt = read_student(path)  # registers the architecture of a user's exported model
    try:
        config = QuantConfig(**ckpt["quant_config"])
        student = quantize_model(build_model(ckpt["arch"], **ckpt["arch_kwargs"]).eval(), config)
        if not isinstance(ckpt["state_dict"], dict):
            raise TypeError("state_dict is not a dict")
        load_state_dict_strict(student, ckpt["state_dict"], f"{path}: state_dict")
        check_finite(ckpt["state_dict"], f"student {path}")
        stored = ckpt["quantizers"]
        for name, q in quantizer_table(student).items():
            if name not in stored:
                raise DFQFError(f"{path}: quantizer {name} missing from the quantizer table")
            if QuantSpec.from_dict(stored[name]["spec"]) != QuantSpec.from_dict(q["spec"]):
                raise DFQFError(f"{path}: quantizer {name} spec differs from the rebuilt student")
    except DFQFError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DFQFError(f"{path}: malformed student checkpoint ({first_line(e)})") from None
    return student.eval(), ckpt
