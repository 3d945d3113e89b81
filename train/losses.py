"""Losses of DFQF (DESIGN §2): generator losses against the frozen teacher, and distillation.

Pure functions plus one hook class; weights live in the frozen `GeneratorLossWeights`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BN_KINDS = ("mse", "kl", "zeroq")
ADV_KINDS = ("kl", "l1")


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Per-row entropy (nats) of probability rows, 0·log 0 = 0."""
    return -(p * torch.log(p.clamp(min=1e-12))).sum(dim=-1)


def inception_score_loss(logits: torch.Tensor, balance_weight: float = 40.0) -> torch.Tensor:
    """mean_i H(p_i) − balance_weight · H(mean_i p_i): confident images, all classes covered."""
    p = F.softmax(logits, dim=1)
    return entropy(p).mean() - balance_weight * entropy(p.mean(dim=0))


class BNStatsHook:
    """Records, at every BatchNorm2d of a model, the batch mean/variance of its input; `loss` compares them
    with the stored running statistics. Use as a context manager or call `remove()`."""

    def __init__(self, model: nn.Module) -> None:
        self.records: list[tuple[torch.Tensor, torch.Tensor, nn.BatchNorm2d]] = []
        self.hooks = [m.register_forward_pre_hook(self._record) for m in model.modules()
                      if isinstance(m, nn.BatchNorm2d)]
        if not self.hooks:
            raise ValueError("the model has no BatchNorm2d layer to take statistics from")

    def _record(self, bn: nn.BatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].float()
        self.records.append((x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False), bn))

    def loss(self, kind: str = "mse") -> torch.Tensor:
        """Mean over recorded layers of the distance between batch and running statistics; clears records.

        mse:   ||mu_b − mu||²/C + ||var_b − var||²/C (GDFQ)
        kl:    mean_c KL(N(mu_b, var_b) ‖ N(mu, var)) (DFQF's Gaussian distance)
        zeroq: ||mu_b − mu||²/C + ||std_b − std||²/C, std = sqrt(var + eps) (ZeroQ)
        """
        if kind not in BN_KINDS:
            raise ValueError(f"unknown BN-statistics loss {kind!r}; supported: {', '.join(BN_KINDS)}")
        if not self.records:
            raise ValueError("no BatchNorm2d input was recorded: run the model first")
        terms = []
        for mu_b, var_b, bn in self.records:
            mu, var = bn.running_mean.float(), bn.running_var.float()
            if kind == "mse":
                terms.append(((mu_b - mu) ** 2).mean() + ((var_b - var) ** 2).mean())
            elif kind == "zeroq":
                std_b, std = torch.sqrt(var_b + bn.eps), torch.sqrt(var + bn.eps)
                terms.append(((mu_b - mu) ** 2).mean() + ((std_b - std) ** 2).mean())
            else:
                var_b, var = var_b + bn.eps, var + bn.eps
                kl = 0.5 * torch.log(var / var_b) + (var_b + (mu_b - mu) ** 2) / (2 * var) - 0.5
                terms.append(kl.mean())
        self.clear()
        return torch.stack(terms).mean()

    def clear(self) -> None:
        self.records = []

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.clear()

    def __enter__(self) -> "BNStatsHook":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)), mean over the batch."""
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def adversarial_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, kind: str = "kl",
                     temperature: float = 1.0) -> torch.Tensor:
    """−discrepancy(T, S): minimizing it makes G produce images on which the student disagrees."""
    if kind == "kl":
        return -_kl(teacher_logits, student_logits, temperature)
    if kind == "l1":
        return -(teacher_logits - student_logits).abs().mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; supported: {', '.join(ADV_KINDS)}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton distillation: T² · KL(softmax(t/T) ‖ softmax(s/T))."""
    return temperature**2 * _kl(teacher_logits, student_logits, temperature)


@dataclass(frozen=True)
class GeneratorLossWeights:
    """Weights of the generator's loss terms; a weight of 0 switches a term off (ablations)."""

    inception: float = 1.0
    balance: float = 40.0
    bn: float = 0.1
    bn_kind: str = "kl"
    adversarial: float = 5.0
    adversarial_kind: str = "kl"
    ce: float = 0.0

    def __post_init__(self) -> None:
        for name in ("inception", "balance", "bn", "adversarial", "ce"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"loss weight {name} must be a finite number >= 0, got {v!r}")
        if self.bn_kind not in BN_KINDS:
            raise ValueError(f"bn_kind must be one of {', '.join(BN_KINDS)}, got {self.bn_kind!r}")
        if self.adversarial_kind not in ADV_KINDS:
            raise ValueError(f"adv_kind must be one of {', '.join(ADV_KINDS)}, got {self.adversarial_kind!r}")


def generator_loss(weights: GeneratorLossWeights, teacher_logits: torch.Tensor, student_logits: torch.Tensor | None,
                   bn_hook: BNStatsHook, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the enabled terms, and each term's value (keys is, bn, adv, ce, total)."""
    total = teacher_logits.new_zeros(())
    terms: dict[str, float] = {}
    if weights.inception > 0:
        t = inception_score_loss(teacher_logits, weights.balance)
        total, terms["is"] = total + weights.inception * t, t.item()
    if weights.bn > 0:
        t = bn_hook.loss(weights.bn_kind)
        total, terms["bn"] = total + weights.bn * t, t.item()
    bn_hook.clear()
    if weights.adversarial > 0 and student_logits is not None:
        t = adversarial_loss(teacher_logits, student_logits, weights.adversarial_kind)
        total, terms["adv"] = total + weights.adversarial * t, t.item()
    if weights.ce > 0 and labels is not None:
        t = F.cross_entropy(teacher_logits, labels)
        total, terms["ce"] = total + weights.ce * t, t.item()
    terms["total"] = total.item()
    return total, terms
