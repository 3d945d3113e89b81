"""Configuration of a DFQF run: dataclass defaults < --smoke preset < --config JSON file < command-line flags.

The resolved config is written to `<out>/config.json`; `--resume` refuses a folder whose config differs in
anything that changes the result (fields marked runtime may differ, and so may the learning rates: a run
stopped by a non-finite loss is resumed with lower ones).
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

from core.cli import (
    check_fields,
    float_list,
    fraction,
    non_negative,
    one_of,
    option,
    parse_options,
    positive,
    runtime_fields,
)
from core.errors import DFQFError

from .data import EVAL_DATA_HELP
from .losses import ADV_KINDS, BN_KINDS, GeneratorLossWeights
from .models.registry import MEAN_HELP, MODEL_HELP, STD_HELP
from .quant.calibrate import OBSERVERS
from .quant.convert import QuantOptions

SCHEDULES = ("two-stage", "alternating")
S_BN_MODES = ("train", "frozen")
LR_FIELDS = {"g_lr", "s_lr", "s_scale_lr"}  # may change on --resume (e.g. after a non-finite loss)
_W = GeneratorLossWeights  # the loss-weight defaults live there (one source)


@dataclass(frozen=True)
class DFQFConfig(QuantOptions):
    # teacher and protocol
    arch: str = option("resnet20", "teacher architecture (see train.models.ARCHS)")
    weights: str | None = option(None, "teacher state_dict (default: the arch's default teacher)")
    model: str | None = option(None, MODEL_HELP)
    mean: list[float] | None = option(None, MEAN_HELP, parse=float_list)
    std: list[float] | None = option(None, STD_HELP, parse=float_list)
    # schedule: two-stage (train G, synthesize and freeze, fine-tune S) or alternating G/S updates
    schedule: str = option("two-stage", "two-stage or alternating", check=one_of(*SCHEDULES))
    seed: int = option(0, "random seed")
    # stage 1: generator
    latent_dim: int = option(256, "generator latent size", check=positive)
    g_width: int = option(128, "generator base channels (its widest layer)", check=positive)
    conditional: bool = option(True, "class-conditional generator")
    g_steps: int = option(300, "generator steps (longer option: 1000)", check=positive)
    g_batch: int = option(128, "generator batch", check=positive)
    g_lr: float = option(5e-3, "generator learning rate (Adam)", check=positive)
    w_inception: float = option(_W.inception, "inception-score loss weight", check=non_negative)
    w_balance: float = option(_W.balance, "class-balance weight inside the inception-score loss", check=non_negative)
    w_bn: float = option(_W.bn, "BN-statistics loss weight", check=non_negative)
    bn_kind: str = option(_W.bn_kind, "BN-statistics distance", check=one_of(*BN_KINDS))
    w_adv: float = option(_W.adversarial, "adversarial loss weight", check=non_negative)
    adv_kind: str = option(_W.adversarial_kind, "adversarial discrepancy", check=one_of(*ADV_KINDS))
    w_ce: float = option(_W.ce, "cross-entropy weight on the sampled labels", check=non_negative)
    g_augment: bool = option(False, "random flip + shift of G's images before the teacher sees them "
                             "(DeepInversion jitter)")
    # stage 2: quantization-aware distillation of the student
    synth_images: int = option(6400, "synthetic images (longer option: 25600)", check=positive)
    s_epochs: int = option(8, "KD epochs over the synthetic set (longer option: 20; 0: no KD, the calibrated "
                           "student, reconstructed with --recon-steps, is the result)", check=non_negative)
    s_batch: int = option(128, "student batch", check=positive)
    s_lr: float = option(1e-4, "student weight learning rate (Adam, cosine)", check=positive)
    s_scale_lr: float = option(1e-4, "LSQ step-size learning rate", check=positive)
    temperature: float = option(4.0, "KD temperature", check=positive)
    w_feat: float = option(0.0, "intermediate-feature distillation weight", check=non_negative)
    s_ema: float = option(0.05, "EMA of the student: half-life as a fraction of its steps (0 disables)",
                          check=fraction)
    s_augment: bool = option(False, "random flip + shift of the synthetic images, teacher logits computed live")
    s_bn: str = option("train", "the student's BN layers during KD (--protocol paper keeps them): train (batch "
                       "statistics, running ones updated) or frozen (the teacher's running statistics, affine "
                       "parameters still learned)", check=one_of(*S_BN_MODES))
    init_observer: str = option("mse", "range observer of the initial student", check=one_of(*OBSERVERS))
    recon_steps: int = option(0, "block reconstruction before KD (train.reconstruct): steps per block, 0 = off",
                              check=non_negative)
    recon_images: int = option(1024, "synthetic images block reconstruction runs on", check=positive)
    # alternating schedule: S steps per G step, total steps
    alt_steps: int = option(3000, "alternating schedule: G steps", check=positive)
    alt_s_per_g: int = option(1, "alternating schedule: S steps per G step", check=positive)
    # runtime (do not change results)
    out: str = option("runs/dfqf", "output folder", runtime=True)
    resume: bool = option(False, "continue the run in --out from its last checkpoint", switch=True, runtime=True)
    device: str = option("auto", "auto, cpu, cuda or cuda:N", runtime=True)
    amp: bool = option(False, "bf16 autocast of the generator step on CUDA")
    data_dir: str | None = option(None, "evaluation data (default $DFQF_DATA_DIR; never used to train)", runtime=True)
    eval_data: str | None = option(None, EVAL_DATA_HELP, runtime=True)
    split: str = option("test", "evaluation split", runtime=True)
    eval_every: int = option(100, "evaluate every N student steps", check=positive, runtime=True)
    eval_limit: int | None = option(2000, "images of the interval evaluations", check=positive, runtime=True)
    checkpoint_every: int = option(100, "checkpoint every N steps", check=positive, runtime=True)
    progress: bool = option(True, "progress bars on stderr", runtime=True)
    smoke: bool = option(False, "the --smoke preset was applied")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.s_bn != "train" and self.protocol != "paper":
            raise DFQFError("--s-bn applies to --protocol paper only: the integer protocol's student has no BN "
                            "(folded into the convs)")
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
        runtime = runtime_fields(DFQFConfig)
        return {k: v for k, v in asdict(self).items() if k not in runtime}

    def resume_differences(self, saved: dict[str, Any]) -> list[str]:
        """Result fields in which `saved` (an earlier config.json) differs from this config; a field added
        after that run was started is compared at its default (the behaviour of the code it ran with)."""
        defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(DFQFConfig)}
        ours = {k: v for k, v in self.result_fields().items() if k not in LR_FIELDS}
        return sorted(k for k in ours if saved.get(k, defaults[k]) != ours[k])


# --smoke: the whole pipeline in seconds on a CPU (used by tests)
SMOKE = dict(g_steps=4, g_batch=16, synth_images=64, s_epochs=1, s_batch=16, alt_steps=6, latent_dim=32,
             eval_every=4, eval_limit=100, checkpoint_every=2)


def resolve(argv: list[str] | None) -> DFQFConfig:
    """Defaults < --smoke preset < --config file < flags."""
    return parse_options(DFQFConfig, argv, "python -m train.dfqf",
                         "Data-free quantization-aware fine-tuning (DFQF) of a CNN teacher.", presets={"smoke": SMOKE})


def with_overrides(config: DFQFConfig, **changes: Any) -> DFQFConfig:
    return replace(config, **changes)
