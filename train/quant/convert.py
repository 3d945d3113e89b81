"""Turn a float teacher into a fake-quant student through a converter table (DESIGN §3).

The student is an fx.GraphModule: BN folded, Conv2d/Linear replaced by QuantConv2d/QuantLinear and
ActQuantizer modules inserted where the integer graph holds quantized tensors:
- the network input (8-bit affine, unsigned with a zero point);
- every tensor a conv/linear, pooling or shape op consumes (unsigned after ReLU, signed otherwise);
- residual sums: `add` may consume one raw conv accumulator (the integer graph rescales the int32
  accumulator straight to the output scale); its other inputs are quantized tensors, and its output is
  quantized by the consumer, after the ReLU when one follows (the ReLU becomes the clamp).
Quantizers are inserted lazily, by the first consumer that needs a quantized input, so a tensor is
quantized once however many consumers it has. Logits (the last layer's output) stay unquantized:
the integer graph returns the int32 accumulator and its scale.

`QuantConfig.protocol = "paper"` builds the DFQF paper's looser, fake-quant-only student instead (README, "The
paper's protocol"): BN is not folded (a trainable float copy of each BatchNorm2d; `train.dfqf --s-bn` sets its
mode during KD), weights have one learned step per tensor, and only the inputs of convs and linears are quantized —
residual sums, pooling and the BN outputs stay float. `lower.compile` refuses such a student.
"""
from __future__ import annotations

import copy
import fnmatch
import operator
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from core.cli import bits_map, one_of, option
from core.errors import DFQFError

from .fold import fold_batch_norm, trace
from .modules import ActQuantizer, QuantConv2d, QuantLinear
from .spec import activation_spec, check_bits, input_spec, weight_spec

PROTOCOLS = ("integer", "paper")
PROTOCOL_HELP = ("integer: BN folded, per-channel weights, every tensor of the integer graph quantized "
                 "(deployable); paper: the DFQF paper's protocol, fake-quant only: BN unfolded and trained, "
                 "per-tensor weights, residual sums in float (lower.compile refuses it)")


def check_bit_overrides(overrides: dict[str, int]) -> None:
    """Every value of a NAME=BITS map is a valid bit width (ValueError, as option checks raise)."""
    for name, bits in overrides.items():
        try:
            check_bits(bits)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths of a student, most specific first:
    - `overrides` maps a quantizer name, or an fnmatch pattern of names, to its bits (a conv/linear module
      name for weights, '<node>_aq' for activations; an exact name wins over patterns, then the first
      matching pattern): mixed-precision policies;
    - `first_last_bits`: the first conv and the last linear, their weights and inputs;
    - `residual_bits` (None: `abits`): activations that more than one layer consumes — the residual stream
      of a ResNet or MobileNetV2 (the block inputs its shortcut and its first conv share);
    - `wbits`, `abits`: everything else.
    `protocol` (PROTOCOLS): "integer", the deployable student; "paper", the paper's fake-quant-only one.

    >>> QuantConfig(overrides={"layer1_*_aq": 8, "layer1_0_relu1_aq": 6}).bits("layer1_0_relu1_aq", 4)
    6
    >>> QuantConfig(overrides={"layer1_*_aq": 8}).bits("layer1_2_relu2_aq", 4)
    8
    """

    wbits: int = 4
    abits: int = 4
    first_last_bits: int = 8
    overrides: dict[str, int] = field(default_factory=dict)
    residual_bits: int | None = None
    protocol: str = "integer"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise DFQFError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if not isinstance(self.overrides, dict) or not all(isinstance(k, str) and k for k in self.overrides):
            raise DFQFError(f"overrides must map quantizer names (or patterns) to bits, got {self.overrides!r}")
        for name, b in [("wbits", self.wbits), ("abits", self.abits), ("first_last_bits", self.first_last_bits),
                        *([("residual_bits", self.residual_bits)] if self.residual_bits is not None else []),
                        *self.overrides.items()]:
            try:
                check_bits(b)
            except ValueError as e:
                raise DFQFError(f"{name} {e}, got {b!r}") from None

    def bits(self, name: str, default: int) -> int:
        """The bits of quantizer `name`, whose policy default is `default`."""
        if name in self.overrides:
            return self.overrides[name]
        return next((b for pattern, b in self.overrides.items() if fnmatch.fnmatchcase(name, pattern)), default)

    def unmatched(self, names: list[str]) -> list[str]:
        """The override keys that name none of `names` (a typo would otherwise silently do nothing)."""
        return [k for k in self.overrides if not any(n == k or fnmatch.fnmatchcase(n, k) for n in names)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class QuantOptions:
    """The bit-width flags every quantizing CLI shares (train.dfqf, train.ptq): a base of their options
    dataclasses, which call `check_fields` in their own `__post_init__`."""

    wbits: int = option(4, "weight bits", check=check_bits)
    abits: int = option(4, "activation bits", check=check_bits)
    first_last_bits: int = option(8, "bits of the first conv and last linear", check=check_bits)
    residual_bits: int | None = option(None, "bits of the activations more than one layer consumes (the "
                                       "residual stream: block inputs shared by the shortcut and the first conv); "
                                       "default: --abits", check=check_bits)
    bits_override: dict[str, int] = option({}, "per-quantizer bits, NAME=BITS[,...]: NAME a conv/linear module "
                                           "(its weights), '<node>_aq' (an activation) or an fnmatch pattern such "
                                           "as 'layer3_*_aq'", parse=bits_map, check=check_bit_overrides)
    protocol: str = option("integer", PROTOCOL_HELP, check=one_of(*PROTOCOLS))

    def quant_config(self) -> QuantConfig:
        return QuantConfig(self.wbits, self.abits, self.first_last_bits, dict(self.bits_override), self.residual_bits,
                           self.protocol)


@dataclass
class _State:
    """What the new graph holds for an original node: quantized (by `quantizer`), or raw float."""

    node: fx.Node
    quantizer: ActQuantizer | None = None
    nonneg: bool = False
    is_acc: bool = False  # raw output of a conv/linear (an int32 accumulator in the integer graph)


class _Converter:
    def __init__(self, gm: fx.GraphModule, config: QuantConfig) -> None:
        self.src, self.config = gm, config
        self.paper = config.protocol == "paper"
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.state: dict[fx.Node, _State] = {}
        self.quantized: dict[fx.Node, _State] = {}  # memo: node -> its quantized version
        self.named: list[str] = []  # every quantizer name whose bits were asked (to check the overrides)
        linear_like = [n for n in gm.graph.nodes if n.op == "call_module"
                       and isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear))]
        if not linear_like:
            raise DFQFError("model has no Conv2d/Linear layer to quantize")
        self.first, self.last = linear_like[0], linear_like[-1]

    # -- helpers ---------------------------------------------------------------------------------
    def bits(self, name: str, default: int) -> int:
        self.named.append(name)
        return self.config.bits(name, default)

    def need_q(self, src: fx.Node, bits: int) -> _State:
        """The quantized version of original node `src`, inserting an ActQuantizer on first use.

        Memoized on the new graph's node, so aliases (Identity shortcuts) share one quantizer."""
        st = self.state[src]
        if st.quantizer is not None:
            return st
        if st.node not in self.quantized:
            name = f"{st.node.name}_aq"
            if self.feeds_edge_layer(src):
                bits = self.config.first_last_bits
            elif self.config.residual_bits is not None and len(src.users) > 1:
                bits = self.config.residual_bits
            q = ActQuantizer(activation_spec(self.bits(name, bits), signed=not st.nonneg))
            self.root.add_module(name, q)
            node = self.graph.call_module(name, (st.node,))
            self.quantized[st.node] = _State(node, q, nonneg=st.nonneg)
        return self.quantized[st.node]

    def feeds_edge_layer(self, src: fx.Node) -> bool:
        """Does `src` reach the first or last conv/linear through shape-only ops? (Their inputs are 8-bit.)"""
        for user in src.users:
            if user is self.first or user is self.last:
                return True
            if CONVERTERS.get(self.kind(user)) in (_passthrough, _identity) and self.feeds_edge_layer(user):
                return True
        return False

    def kind(self, n: fx.Node) -> Any:
        return type(self.module_of(n)) if n.op == "call_module" else n.target

    def module_of(self, n: fx.Node) -> nn.Module:
        return self.src.get_submodule(n.target)

    # -- conversion --------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        for n in self.src.graph.nodes:
            if n.op == "placeholder":
                node = self.graph.placeholder(n.name)
                q = ActQuantizer(input_spec(self.bits("input_aq", self.config.first_last_bits)))
                self.root.add_module("input_aq", q)
                self.state[n] = _State(self.graph.call_module("input_aq", (node,)), q)
            elif n.op == "output":
                self.graph.output(fx.node.map_arg(n.args[0], lambda a: self.state[a].node))
            elif n.op == "get_attr":
                raise DFQFError(f"unsupported graph node {n.name}: parameters used outside a layer")
            else:
                self.state[n] = self.convert(n)
        unmatched = self.config.unmatched(self.named)
        if unmatched:
            raise DFQFError(f"bit override(s) {', '.join(unmatched)} match no quantizer of this model; its "
                            f"quantizers: {', '.join(self.named)}")
        return fx.GraphModule(self.root, self.graph)

    def convert(self, n: fx.Node) -> _State:
        handler = CONVERTERS.get(self.kind(n))
        if handler is None:
            raise DFQFError(f"unsupported layer {_describe(n, self.kind(n))}; supported: {supported_layers()}")
        return handler(self, n)

    def add_module_node(self, n: fx.Node, module: nn.Module, args: tuple) -> fx.Node:
        """Call `module` registered under the original module path, so teacher key names survive."""
        _add_nested(self.root, n.target, module)
        return self.graph.call_module(n.target, args)


def _add_nested(root: nn.Module, name: str, module: nn.Module) -> None:
    """Register `module` at dotted path `name`, creating empty parents (keeps teacher key names)."""
    parent = root
    *path, leaf = name.split(".")
    for p in path:
        if not hasattr(parent, p):
            parent.add_module(p, nn.Module())
        parent = getattr(parent, p)
    parent.add_module(leaf, module)


def _describe(n: fx.Node, kind: Any) -> str:
    if n.op == "call_module":
        return f"{n.target} ({kind.__name__})"
    return f"{n.name} ({getattr(kind, '__name__', kind)})"


# -- converters: one function per supported layer kind ------------------------------------------------
def _conv_or_linear(c: _Converter, n: fx.Node) -> _State:
    mod = c.module_of(n)
    edge = n is c.first or n is c.last
    wbits = c.bits(n.target, c.config.first_last_bits if edge else c.config.wbits)
    x = c.need_q(n.args[0], c.config.abits)  # need_q raises it to first_last_bits for edge layers
    spec = weight_spec(wbits, "tensor" if c.paper else "channel")
    qmod = (QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear)(mod, spec)
    return _State(c.add_module_node(n, qmod, (x.node,)), is_acc=True)


def _relu(c: _Converter, n: fx.Node) -> _State:
    src = c.state[n.args[0]]
    node = _copy(c, n, (src.node,) + tuple(n.args[1:]))
    # ReLU of an already quantized tensor (zero point 0) is a clamp on the same grid
    return _State(node, src.quantizer, nonneg=True)


def _add(c: _Converter, n: fx.Node) -> _State:
    if len(n.args) != 2 or n.kwargs or not all(isinstance(a, fx.Node) for a in n.args):
        raise DFQFError(f"unsupported add {n.name}: only tensor + tensor is supported")
    if c.paper:  # a float sum of float terms
        return _State(c.graph.call_function(operator.add, tuple(c.state[a].node for a in n.args), name=n.name))
    fused = next((a for a in n.args if c.state[a].is_acc), None)
    args = tuple(c.state[a].node if a is fused else c.need_q(a, c.config.abits).node for a in n.args)
    return _State(c.graph.call_function(operator.add, args, name=n.name))


def _passthrough(c: _Converter, n: fx.Node) -> _State:
    """Shape ops and max pooling: exact on the integer grid, the output keeps the input's quantizer (the
    paper's protocol quantizes no input here: a float input stays float)."""
    x = c.state[n.args[0]] if c.paper else c.need_q(n.args[0], c.config.abits)
    node = _copy(c, n, (x.node,) + tuple(n.args[1:]))
    return _State(node, x.quantizer, nonneg=x.nonneg)


def _average(c: _Converter, n: fx.Node) -> _State:
    """Average pooling: integer sum then one requantization; the consumer quantizes the output (under the
    paper's protocol the input is not quantized either)."""
    x = c.state[n.args[0]] if c.paper else c.need_q(n.args[0], c.config.abits)
    return _State(_copy(c, n, (x.node,) + tuple(n.args[1:])), nonneg=x.nonneg)


def _identity(c: _Converter, n: fx.Node) -> _State:
    return c.state[n.args[0]]


def _batch_norm(c: _Converter, n: fx.Node) -> _State:
    """A BN the fold left: under the paper's protocol every BN (kept in float), else one that follows no
    conv (nothing to fold it into: the integer graph has no float affine op)."""
    if not c.paper:
        raise DFQFError(f"{_describe(n, c.kind(n))} does not follow a Conv2d whose only user it is, so it cannot "
                        f"be folded; the integer protocol needs every BatchNorm2d folded into a conv")
    bn = copy.deepcopy(c.module_of(n))
    for param in bn.parameters():  # a frozen teacher's BN: the student's copy is trained
        param.requires_grad_(True)
    return _State(c.add_module_node(n, bn, (c.state[n.args[0]].node,)))


def _copy(c: _Converter, n: fx.Node, args: tuple) -> fx.Node:
    if n.op == "call_module":
        return c.add_module_node(n, c.module_of(n), args)
    return c.graph.create_node(n.op, n.target, args, dict(n.kwargs), n.name)


CONVERTERS: dict[Any, Callable[[_Converter, fx.Node], _State]] = {
    nn.Conv2d: _conv_or_linear,
    nn.Linear: _conv_or_linear,
    nn.ReLU: _relu,
    nn.ReLU6: _relu,
    F.relu: _relu,
    torch.relu: _relu,
    "relu": _relu,
    operator.add: _add,
    operator.iadd: _add,
    torch.add: _add,
    nn.MaxPool2d: _passthrough,
    nn.Flatten: _passthrough,
    torch.flatten: _passthrough,
    "flatten": _passthrough,
    "view": _passthrough,
    "reshape": _passthrough,
    operator.getitem: _passthrough,
    F.pad: _passthrough,
    nn.AdaptiveAvgPool2d: _average,
    nn.AvgPool2d: _average,
    F.adaptive_avg_pool2d: _average,
    nn.Identity: _identity,
    nn.Dropout: _identity,
    nn.BatchNorm2d: _batch_norm,
}


def kind_names(table: dict[Any, Any]) -> str:
    """The layer kinds a converter table handles, by name, for error messages."""
    return ", ".join(sorted({getattr(k, "__name__", str(k)) for k in table}))


def supported_layers() -> str:
    return kind_names(CONVERTERS)


def quantize_model(model: nn.Module, config: QuantConfig) -> fx.GraphModule:
    """BN-fold `model` (not under the paper's protocol) and return its fake-quant student (quantizer scales
    still uninitialized: calibrate)."""
    if config.protocol == "paper":  # the converter copies each BN; the other layers are rebuilt or stateless
        src = model if isinstance(model, fx.GraphModule) else trace(model)
    else:
        src = fold_batch_norm(model)
    student = _Converter(src, config).run()
    student.graph.lint()
    return student.eval()
