"""Data-free activation statistics: propagate per-channel Gaussians from the BN layers through a graph.

DFQ (Nagel et al. 2019) treats every BN output as N(beta, gamma^2) per channel; through ReLU it becomes a
clipped normal, whose mean and variance have closed forms. Residual sums add means and variances
(independence assumed), option-A shortcuts pad zero channels, and pooling/shape ops keep the per-channel
moments (pooling variance is over-estimated, a safe direction for ranges).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from core.errors import DFQFError

from ..quant.modules import ActQuantizer


@dataclass
class Gaussian:
    mean: torch.Tensor  # [C]
    var: torch.Tensor  # [C]

    @property
    def std(self) -> torch.Tensor:
        return self.var.clamp(min=0).sqrt()


def relu_moments(g: Gaussian) -> Gaussian:
    """Mean and variance of max(0, X) for X ~ N(mu, sigma^2), per channel.

    E = mu*Phi(a) + sigma*phi(a), E[X^2] = (mu^2 + sigma^2)*Phi(a) + mu*sigma*phi(a), a = mu/sigma.
    """
    mu, sigma = g.mean.double(), g.std.double().clamp(min=1e-12)
    a = mu / sigma
    phi = torch.exp(-0.5 * a**2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2)))
    m1 = mu * cdf + sigma * phi
    m2 = (mu**2 + sigma**2) * cdf + mu * sigma * phi
    return Gaussian(m1.float(), (m2 - m1**2).clamp(min=0).float())


class GaussianPropagation(fx.Interpreter):
    """Run a (folded or student) graph on per-channel Gaussians instead of tensors.

    conv_stats maps conv module names to the Gaussian of their output (from the BN they absorbed, or the BN
    that follows them in an unfolded graph, which then passes it on).
    After run(), `at_quantizer` holds the Gaussian each ActQuantizer sees and `at_input` the Gaussian
    entering each conv/linear module.
    """

    def __init__(self, gm: fx.GraphModule, conv_stats: dict[str, Gaussian], input_stats: Gaussian) -> None:
        super().__init__(gm)
        self.conv_stats, self.input_stats = conv_stats, input_stats
        self.at_quantizer: dict[str, Gaussian] = {}
        self.at_input: dict[str, Gaussian] = {}

    def placeholder(self, target, args, kwargs):  # noqa: ANN001, ANN201 (fx.Interpreter signature)
        return self.input_stats

    def call_module(self, target, args, kwargs):  # noqa: ANN001, ANN201
        mod = self.module.get_submodule(target)
        x = args[0]
        if isinstance(mod, ActQuantizer):
            self.at_quantizer[target] = x
            return x
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            self.at_input[target] = x
            return self.conv_stats.get(target)
        if isinstance(mod, nn.BatchNorm2d):  # unfolded (the paper's protocol): its conv returned its output
            return x
        if isinstance(mod, (nn.ReLU, nn.ReLU6)):
            return relu_moments(x) if x is not None else None
        if isinstance(mod, (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)):
            return x
        raise DFQFError(f"BN-statistics propagation does not support {type(mod).__name__} ({target})")

    def call_function(self, target, args, kwargs):  # noqa: ANN001, ANN201
        x = args[0]
        if target in (F.relu, torch.relu):
            return relu_moments(x) if x is not None else None
        if target in (operator.add, operator.iadd, torch.add):
            a, b = args
            if a is None or b is None:
                return None
            return Gaussian(a.mean + b.mean, a.var + b.var)
        if target is operator.getitem:
            index = args[1]
            if isinstance(index, tuple) and len(index) > 1 and index[1] != slice(None):
                raise DFQFError("BN-statistics propagation supports spatial slicing only")
            return x
        if target is F.pad:
            pad = args[1] if len(args) > 1 else kwargs["pad"]
            if len(pad) != 6 or any(pad[:4]):
                raise DFQFError("BN-statistics propagation supports channel zero-padding only")
            z = lambda t: F.pad(t, (pad[4], pad[5]))  # noqa: E731
            return Gaussian(z(x.mean), z(x.var))
        if target in (torch.flatten, F.adaptive_avg_pool2d):
            return x
        raise DFQFError(f"BN-statistics propagation does not support {getattr(target, '__name__', target)}")

    def call_method(self, target, args, kwargs):  # noqa: ANN001, ANN201
        if target in ("flatten", "view", "reshape"):
            return args[0]
        if target == "relu":
            return relu_moments(args[0])
        raise DFQFError(f"BN-statistics propagation does not support .{target}()")


def propagate(gm: fx.GraphModule, conv_stats: dict[str, Gaussian], input_stats: Gaussian) -> GaussianPropagation:
    interp = GaussianPropagation(gm, conv_stats, input_stats)
    interp.run(None)
    return interp
