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


def inception_score_loss(logits: torch.Tensor, balance_weight: float) -> torch.Tensor:
    """mean_i H(p_i) − balance_weight · H(mean_i p_i): confident images, all classes covered."""
    p = F.softmax(logits, dim=1)
    return entropy(p).mean() - balance_weight * entropy(p.mean(dim=0))


class BNStatsHook:
    """Records, at every BatchNorm2d of a model, the batch mean/variance (biased) of its input together with the
    layer's running statistics; `loss` compares them. Use as a context manager or call `remove()`.

    Layers built with track_running_stats=False have nothing to compare with and are skipped. The running
    statistics are copied when the layer runs, so a model in train mode is compared with the statistics it
    had before this batch updated them.
    """

    def __init__(self, model: nn.Module) -> None:
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]] = []
        self.hooks = [m.register_forward_pre_hook(self._record) for m in model.modules()
                      if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
        if not self.hooks:
            raise ValueError("the model has no BatchNorm2d layer with running statistics to compare with")

    def _record(self, bn: nn.BatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].float()
        self.records.append((x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False),
                             bn.running_mean.detach().float().clone(), bn.running_var.detach().float().clone(), bn.eps))

    def loss(self, kind: str = "mse") -> torch.Tensor:
        """Mean over recorded layers of the distance between batch and running statistics; clears records.

        mse:   ||mu_b − mu||²/C + ||var_b − var||²/C (GDFQ)
        kl:    mean_c KL(N(mu_b, var_b) ‖ N(mu, var))
                 = log(sigma/sigma_b) + (var_b + (mu_b − mu)²)/(2 var) − 1/2 (DFQF), with eps added to both
               variances (as BN does) so that a constant channel stays finite
        zeroq: ||mu_b − mu||²/C + ||std_b − std||²/C, std = sqrt(var + eps) (ZeroQ)
        E.g. one channel, mu_b = 1, var_b = 1, mu = 0, var = 1, eps = 0: mse 1, kl 0.5, zeroq 1.
        """
        if kind not in BN_KINDS:
            raise ValueError(f"unknown BN-statistics loss {kind!r}; supported: {', '.join(BN_KINDS)}")
        if not self.records:
            raise ValueError("no BatchNorm2d input was recorded: run the model first")
        terms = []
        for mu_b, var_b, mu, var, eps in self.records:
            if kind == "mse":
                terms.append(((mu_b - mu) ** 2).mean() + ((var_b - var) ** 2).mean())
            elif kind == "zeroq":
                std_b, std = torch.sqrt(var_b + eps), torch.sqrt(var + eps)
                terms.append(((mu_b - mu) ** 2).mean() + ((std_b - std) ** 2).mean())
            else:
                var_b, var = var_b + eps, var + eps
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
    """Weights of the generator's loss terms; a weight of 0 switches a term off (ablations).

    The defaults are `train.dfqf`'s (its config takes them from here): class balance x5 and BN statistics
    x10 match the teacher's BN statistics in 300 steps, the adversarial term is off in the two-stage
    schedule (with a frozen student it diverges), and cross-entropy on the sampled labels is on. The seed
    paper's code uses `PAPER_LOSS_WEIGHTS` (README, "Why these loss weights").
    """

    inception: float = 1.0
    balance: float = 5.0
    bn: float = 10.0
    bn_kind: str = "kl"
    adversarial: float = 0.0
    adversarial_kind: str = "kl"
    ce: float = 1.0

    def __post_init__(self) -> None:
        for name in ("inception", "balance", "bn", "adversarial", "ce"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"loss weight {name} must be a finite number >= 0, got {v!r}")
        if self.bn_kind not in BN_KINDS:
            raise ValueError(f"bn_kind must be one of {', '.join(BN_KINDS)}, got {self.bn_kind!r}")
        if self.adversarial_kind not in ADV_KINDS:
            raise ValueError(f"adversarial_kind must be one of {', '.join(ADV_KINDS)}, got {self.adversarial_kind!r}")


PAPER_LOSS_WEIGHTS = GeneratorLossWeights(balance=40.0, bn=0.1, adversarial=5.0, ce=0.0)


def generator_loss(weights: GeneratorLossWeights, teacher_logits: torch.Tensor, student_logits: torch.Tensor | None,
                   bn_hook: BNStatsHook, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the enabled terms, and each computed term's unweighted value.

    Keys: "is", "bn", "adv", "ce" for the terms that were computed (a weight of 0, or no student logits /
    labels, leaves a term out of both the graph and the dict), and "total". `bn_hook` is always cleared.
    """
    total = teacher_logits.new_zeros(())
    terms: dict[str, torch.Tensor] = {}
    if weights.inception > 0:
        terms["is"] = inception_score_loss(teacher_logits, weights.balance)
        total = total + weights.inception * terms["is"]
    if weights.bn > 0:
        terms["bn"] = bn_hook.loss(weights.bn_kind)
        total = total + weights.bn * terms["bn"]
    bn_hook.clear()
    if weights.adversarial > 0 and student_logits is not None:
        terms["adv"] = adversarial_loss(teacher_logits, student_logits, weights.adversarial_kind)
        total = total + weights.adversarial * terms["adv"]
    if weights.ce > 0 and labels is not None:
        terms["ce"] = F.cross_entropy(teacher_logits, labels)
        total = total + weights.ce * terms["ce"]
    terms["total"] = total
    values = torch.stack([t.detach().float() for t in terms.values()]).tolist()  # one device sync, not five
    return total, dict(zip(terms, values))
