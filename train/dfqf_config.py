"""Configuration of a DFQF run: dataclass defaults < --config JSON file < command-line flags.

The resolved config is written to `<out>/config.json`; `--resume` refuses a folder whose config differs
in anything that changes the result (fields in RUNTIME_ONLY may differ).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .errors import CLIParser, DFQFError, bits_int
from .losses import GeneratorLossWeights
from .quant.calibrate import OBSERVERS

SCHEDULES = ("two-stage", "alternating")
RUNTIME_ONLY = {"out", "resume", "device", "data_dir", "eval_every", "eval_limit", "checkpoint_every", "split",
                "workers", "progress"}


@dataclass(frozen=True)
class DFQFConfig:
    # teacher and protocol
    arch: str = "resnet20"
    weights: str | None = None
    wbits: int = 4
    abits: int = 4
    first_last_bits: int = 8
    # schedule: two-stage (train G, synthesize and freeze, fine-tune S) or alternating G/S updates
    schedule: str = "two-stage"
    seed: int = 0
    # stage 1: generator
    latent_dim: int = 256
    g_width: int = 128  # generator base channels (its widest layer)
    conditional: bool = True
    g_steps: int = 300  # longer option: 1000
    g_batch: int = 128
    g_lr: float = 5e-3
    w_inception: float = 1.0
    w_balance: float = 5.0
    w_bn: float = 10.0
    bn_kind: str = "kl"
    w_adv: float = 0.0
    adv_kind: str = "kl"
    w_ce: float = 1.0
    g_augment: bool = False  # random flip + shift of G's images before the teacher sees them (DeepInversion jitter)
    # stage 2: quantization-aware distillation of the student
    synth_images: int = 6400  # longer option: 25600
    s_epochs: int = 8  # longer option: 20
    s_batch: int = 128
    s_lr: float = 1e-4
    s_scale_lr: float = 1e-4
    temperature: float = 4.0
    w_feat: float = 0.0  # intermediate-feature distillation (student quantizer outputs vs teacher nodes)
    s_ema: float = 0.05  # EMA of the student: half-life as a fraction of its steps (0 disables)
    s_augment: bool = False  # random flip + shift of the synthetic images, teacher logits computed live
    init_observer: str = "mse"
    # alternating schedule: S steps per G step, total steps
    alt_steps: int = 3000
    alt_s_per_g: int = 1
    # runtime (do not change results)
    out: str = "runs/dfqf"
    resume: bool = False
    device: str = "auto"
    amp: bool = False
    data_dir: str | None = None
    split: str = "test"
    eval_every: int = 100
    eval_limit: int | None = 2000
    checkpoint_every: int = 100
    progress: bool = True
    smoke: bool = False

    def __post_init__(self) -> None:
        for name in ("wbits", "abits", "first_last_bits"):
            if not 2 <= getattr(self, name) <= 8:
                raise DFQFError(f"{name} must be in 2..8, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise DFQFError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("g_steps", "g_batch", "synth_images", "s_epochs", "s_batch", "alt_steps", "alt_s_per_g",
                     "latent_dim", "g_width", "checkpoint_every", "eval_every"):
            if getattr(self, name) <= 0:
                raise DFQFError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("g_lr", "s_lr", "s_scale_lr", "temperature"):
            if not getattr(self, name) > 0:
                raise DFQFError(f"{name} must be positive, got {getattr(self, name)}")
        if not (math.isfinite(self.w_feat) and self.w_feat >= 0):
            raise DFQFError(f"w_feat must be a finite number >= 0, got {self.w_feat}")
        if not 0 <= self.s_ema <= 1:
            raise DFQFError(f"s_ema (EMA half-life as a fraction of the student steps) must be in 0..1, "
                            f"got {self.s_ema}")
        if self.init_observer not in OBSERVERS:
            raise DFQFError(f"init_observer must be one of {', '.join(OBSERVERS)}, got {self.init_observer!r}")
        try:
            self.loss_weights()
        except ValueError as e:
            raise DFQFError(str(e)) from None

    def loss_weights(self) -> GeneratorLossWeights:
        return GeneratorLossWeights(inception=self.w_inception, balance=self.w_balance, bn=self.w_bn,
                                    bn_kind=self.bn_kind, adversarial=self.w_adv, adversarial_kind=self.adv_kind,
                                    ce=self.w_ce)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def result_fields(self) -> dict[str, Any]:
        """The fields a resumed run must share with the original."""
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_ONLY}


# --smoke: the whole pipeline in seconds on a CPU (used by tests)
SMOKE = dict(g_steps=4, g_batch=16, synth_images=64, s_epochs=1, s_batch=16, alt_steps=6, latent_dim=32,
             eval_every=4, eval_limit=100, checkpoint_every=2)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parser() -> argparse.ArgumentParser:
    p = CLIParser(prog="python -m train.dfqf", argument_default=argparse.SUPPRESS,
                  description="Data-free quantization-aware fine-tuning (DFQF) of a CNN teacher.")
    p.add_argument("--config", help="JSON file with any of the fields below (flags override it)")
    scalar = {"int": int, "float": float, "str": str}
    for f in fields(DFQFConfig):
        flag = "--" + f.name.replace("_", "-")
        base = str(f.type).split(" |")[0]  # "int | None" -> "int" (annotations are strings here)
        if f.name in ("wbits", "abits", "first_last_bits"):
            p.add_argument(flag, type=bits_int, help=f"bits 2..8 (default {f.default})")
        elif f.name in ("resume", "smoke"):
            p.add_argument(flag, action="store_true")
        elif base == "bool":
            p.add_argument(flag, type=_bool, metavar="BOOL", help=f"(default {f.default})")
        else:
            p.add_argument(flag, type=scalar[base], help=f"(default {f.default})")
    return p


def resolve(argv: list[str] | None) -> DFQFConfig:
    """Defaults < --smoke preset < --config file < flags."""
    args = vars(parser().parse_args(argv))
    values: dict[str, Any] = {}
    if args.get("smoke"):
        values.update(SMOKE)
    config_file = args.pop("config", None)
    if config_file:
        values.update(_read_config_file(Path(config_file)))
    values.update(args)
    try:
        return DFQFConfig(**values)
    except TypeError as e:
        raise DFQFError(f"bad configuration: {e}") from None


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise DFQFError(f"cannot read --config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DFQFError(f"--config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DFQFError(f"--config {path} must hold a JSON object")
    known = {f.name for f in fields(DFQFConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DFQFError(f"--config {path}: unknown fields {unknown}")
    return data


def with_overrides(config: DFQFConfig, **changes: Any) -> DFQFConfig:
    return replace(config, **changes)
