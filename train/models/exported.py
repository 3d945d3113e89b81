"""A user's own model saved with `torch.export.save` (.pt2) as a teacher: its ATen graph rebuilt as a module
graph (Conv2d, BatchNorm2d, Linear, pooling modules; relu/add/flatten functions), which the quantization
converter (`train.quant.convert`) and BN folding read like any registry model.

A converter table maps each ATen op of the exported graph to a module or function; an op outside it is one
DFQFError listing the supported ones. The .pt2 file is read by `torch.export.load` with tensors only: a pickled
object inside the archive (which could run code) is refused.
"""
from __future__ import annotations

import contextlib
import operator
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.export.graph_signature import InputKind

from core.errors import DFQFError, first_line

aten = torch.ops.aten
Builder = Callable[["_Rebuild", fx.Node], Any]


class _Rebuild:
    """Walks the exported graph, emitting a new graph over modules registered on `root`."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.src, self.root, self.graph = gm, nn.Module(), fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.consts: dict[fx.Node, Any] = {}  # parameters and what is computed from them alone

    def tensor(self, a: Any) -> torch.Tensor | None:
        """The constant tensor argument `a` (a parameter, or computed from parameters only); None stays None."""
        if a is None:
            return None
        if not (isinstance(a, fx.Node) and a in self.consts):
            raise DFQFError(f"{a} is not a parameter of the exported model (a weight computed from the input?)")
        return self.consts[a]

    def fold(self, n: fx.Node) -> bool:
        """Evaluate `n` now if it computes on parameters only (e.g. a transposed weight); whether it did."""
        if n.op == "get_attr":
            self.consts[n] = operator.attrgetter(n.target)(self.src).detach()
            return True
        inputs = n.all_input_nodes
        aten_op = isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "aten"
        if n.op != "call_function" or not aten_op or not inputs or any(a not in self.consts for a in inputs):
            return False
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: self.consts[a])
        with torch.no_grad():
            self.consts[n] = n.target(*args, **kwargs)
        return True

    def module(self, n: fx.Node, m: nn.Module, x: Any) -> fx.Node:
        name = n.name
        self.root.add_module(name, m)
        return self.graph.call_module(name, (self.env[x],))

    def function(self, fn: Callable, *args: Any) -> fx.Node:
        return self.graph.call_function(fn, tuple(self.env.get(a, a) if isinstance(a, fx.Node) else a
                                                  for a in args))


def _arg(n: fx.Node, i: int, default: Any) -> Any:
    return n.args[i] if len(n.args) > i else default


def _conv_module(r: _Rebuild, n: fx.Node, w: torch.Tensor, b: torch.Tensor | None, stride: Any, padding: Any,
                 dilation: Any, groups: int) -> fx.Node:
    if w.ndim != 4:
        raise DFQFError(f"{n.name}: only 2-d convolutions are supported, not a {w.ndim - 2}-d one")
    conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), tuple(stride), padding, tuple(dilation),
                     groups, bias=b is not None)
    with torch.no_grad():
        conv.weight.copy_(w)
        if b is not None:
            conv.bias.copy_(b)
    return r.module(n, conv, n.args[0])


def _conv(r: _Rebuild, n: fx.Node) -> fx.Node:
    """aten.conv2d (padding a list, or "same"/"valid")."""
    w, b = r.tensor(n.args[1]), r.tensor(_arg(n, 2, None))
    stride, padding, dilation = _arg(n, 3, [1, 1]), _arg(n, 4, [0, 0]), _arg(n, 5, [1, 1])
    if isinstance(padding, str):
        if padding == "same" and (any(d * (k - 1) % 2 for d, k in zip(dilation, w.shape[2:])) or max(stride) > 1):
            raise DFQFError(f"{n.name}: padding='same' is supported for odd kernels at stride 1 only")
        padding = [0, 0] if padding == "valid" else [d * (k - 1) // 2 for d, k in zip(dilation, w.shape[2:])]
    return _conv_module(r, n, w, b, stride, tuple(padding), dilation, _arg(n, 6, 1))


def _convolution(r: _Rebuild, n: fx.Node) -> fx.Node:
    """aten.convolution (the decomposed form): input, weight, bias, stride, padding, dilation, transposed,
    output_padding, groups."""
    if n.args[6]:
        raise DFQFError(f"{n.name}: transposed convolutions are not supported")
    return _conv_module(r, n, r.tensor(n.args[1]), r.tensor(n.args[2]), n.args[3], tuple(n.args[4]), n.args[5],
                        n.args[8])


def _batch_norm(r: _Rebuild, n: fx.Node) -> fx.Node:
    """aten.batch_norm (eps is argument 7) and aten._native_batch_norm_legit_no_training (eps 6, a tuple)."""
    w, b, mean, var = (r.tensor(a) for a in n.args[1:5])
    legit = n.target is aten._native_batch_norm_legit_no_training.default
    if not legit and _arg(n, 5, False):
        raise DFQFError(f"{n.name}: a batch norm in training mode (export the model in eval mode)")
    bn = nn.BatchNorm2d(len(mean), eps=float(_arg(n, 6 if legit else 7, 1e-5)), affine=w is not None)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if w is not None:
            bn.weight.copy_(w)
            bn.bias.copy_(b)
    return r.module(n, bn.eval(), n.args[0])


def _linear_module(r: _Rebuild, n: fx.Node, x: fx.Node, w: torch.Tensor, b: torch.Tensor | None) -> fx.Node:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return r.module(n, lin, x)


def _linear(r: _Rebuild, n: fx.Node) -> fx.Node:
    return _linear_module(r, n, n.args[0], r.tensor(n.args[1]), r.tensor(_arg(n, 2, None)))


def _addmm(r: _Rebuild, n: fx.Node) -> fx.Node:
    """aten.addmm(bias, x, weight^T): the decomposed linear layer."""
    if _arg(n, 3, 1) != 1 or n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
        raise DFQFError(f"{n.name}: addmm with alpha/beta other than 1")
    return _linear_module(r, n, n.args[1], r.tensor(n.args[2]).t(), r.tensor(n.args[0]))


def _max_pool(r: _Rebuild, n: fx.Node) -> fx.Node:
    kernel = _arg(n, 1, None)
    pool = nn.MaxPool2d(tuple(kernel), tuple(_arg(n, 2, kernel) or kernel), tuple(_arg(n, 3, [0, 0])),
                        tuple(_arg(n, 4, [1, 1])), ceil_mode=bool(_arg(n, 5, False)))
    return r.module(n, pool, n.args[0])


def _avg_pool(r: _Rebuild, n: fx.Node) -> fx.Node:
    kernel = _arg(n, 1, None)
    pool = nn.AvgPool2d(tuple(kernel), tuple(_arg(n, 2, kernel) or kernel), tuple(_arg(n, 3, [0, 0])),
                        ceil_mode=bool(_arg(n, 4, False)))
    return r.module(n, pool, n.args[0])


def _mean(r: _Rebuild, n: fx.Node) -> fx.Node:
    dims = sorted(d % 4 for d in n.args[1])
    if dims != [2, 3]:
        raise DFQFError(f"{n.name}: only the spatial mean (global average pooling) is supported, not dims {dims}")
    pooled = r.module(n, nn.AdaptiveAvgPool2d(1), n.args[0])
    return pooled if _arg(n, 2, False) else r.graph.call_function(torch.flatten, (pooled, 1))


def _hardtanh(r: _Rebuild, n: fx.Node) -> fx.Node:
    if (float(_arg(n, 1, -1.0)), float(_arg(n, 2, 1.0))) != (0.0, 6.0):
        raise DFQFError(f"{n.name}: hardtanh is supported as ReLU6 (min 0, max 6) only")
    return r.module(n, nn.ReLU6(), n.args[0])


def _first(r: _Rebuild, n: fx.Node) -> fx.Node:
    """operator.getitem(tuple, 0) of a batch norm's or a max pool's tuple output: the output itself."""
    if n.args[1] != 0:
        raise DFQFError(f"{n.name}: uses output {n.args[1]} of {n.args[0].name} (its statistics or indices)")
    return r.env[n.args[0]]


def _squeeze(r: _Rebuild, n: fx.Node) -> fx.Node:
    """squeeze of a pooled [N, C, 1, 1] tensor: to [N, C] a flatten, to [N, C, 1] (one of two squeezes) kept."""
    shape = list(n.args[0].meta["val"].shape) if "val" in n.args[0].meta else []
    out = list(n.meta["val"].shape) if "val" in n.meta else []
    if len(shape) < 3 or set(shape[2:]) != {1} or out[:2] != shape[:2] or set(out[2:]) - {1}:
        raise DFQFError(f"{n.name}: only a squeeze of a pooled [N, C, 1, 1] tensor to [N, C] is supported")
    return r.function(torch.flatten, n.args[0], 1) if len(out) == 2 else r.env[n.args[0]]


def _reshape(r: _Rebuild, n: fx.Node) -> fx.Node:
    """view/reshape to [batch, features] (before the classifier): a flatten."""
    shape = list(n.args[1])
    if len(shape) != 2 or not isinstance(shape[1], int):
        raise DFQFError(f"{n.name}: only a reshape to [batch, features] is supported")
    return r.function(torch.flatten, n.args[0], 1)


ATEN_OPS: dict[Any, Builder] = {
    aten.conv2d.default: _conv,
    aten.conv2d.padding: _conv,
    aten.convolution.default: _convolution,
    aten.batch_norm.default: _batch_norm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm,
    aten.linear.default: _linear,
    aten.addmm.default: _addmm,
    aten.max_pool2d.default: _max_pool,
    aten.max_pool2d_with_indices.default: _max_pool,
    aten.avg_pool2d.default: _avg_pool,
    aten.adaptive_avg_pool2d.default: lambda r, n: r.module(n, nn.AdaptiveAvgPool2d(tuple(n.args[1])), n.args[0]),
    aten.mean.dim: _mean,
    aten.relu.default: lambda r, n: r.function(torch.relu, n.args[0]),
    aten.relu_.default: lambda r, n: r.function(torch.relu, n.args[0]),
    aten.relu6.default: lambda r, n: r.module(n, nn.ReLU6(), n.args[0]),
    aten.hardtanh.default: _hardtanh,
    aten.hardtanh_.default: _hardtanh,
    aten.add.Tensor: lambda r, n: r.function(operator.add, *n.args[:2]),
    aten.add_.Tensor: lambda r, n: r.function(operator.add, *n.args[:2]),
    aten.flatten.using_ints: lambda r, n: r.function(torch.flatten, n.args[0], _arg(n, 1, 0)),
    aten.view.default: _reshape,
    aten.reshape.default: _reshape,
    aten.squeeze.dims: _squeeze,
    aten.squeeze.dim: _squeeze,
    operator.getitem: _first,
    aten.dropout.default: lambda r, n: r.env[n.args[0]],
    aten.clone.default: lambda r, n: r.env[n.args[0]],
}


def supported_aten_ops() -> str:
    return ", ".join(str(op).removeprefix("aten.") if op is not operator.getitem else "getitem" for op in ATEN_OPS)


def module_from_exported(gm: fx.GraphModule) -> fx.GraphModule:
    """The module graph of an exported program's `module()`."""
    r = _Rebuild(gm)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            r.env[n] = r.graph.placeholder(n.name)
        elif (n.op == "call_module" and n.target == "_guards_fn") or r.fold(n):
            continue
        elif n.op == "output":
            out = n.args[0]
            out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
            if not isinstance(out, fx.Node):
                raise DFQFError("the exported model must return one tensor (the logits)")
            r.graph.output(r.env[out])
        elif n.op == "call_function" and n.target in ATEN_OPS:
            r.env[n] = ATEN_OPS[n.target](r, n)
        else:
            raise DFQFError(f"the exported model's op {n.target} ({n.name}) is not supported; supported: "
                            f"{supported_aten_ops()}")
    return fx.GraphModule(r.root, r.graph)


@contextlib.contextmanager
def _tensors_only() -> Iterator[None]:
    """While a .pt2 archive is read: tensors load with weights_only=True and any pickled object is refused.
    (torch.export.load unpickles some payloads with weights_only=False or pickle.loads, which runs code.)"""
    import pickle

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise DFQFError("it holds a pickled Python object (only tensors and the graph are accepted; a pickle "
                        "can run code)")

    def tensors(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return torch_load(f, *args, **kwargs)
        except pickle.UnpicklingError:
            refuse()

    torch_load, loads, load_obj = torch.load, pickle.loads, torch._C._pickle_load_obj
    torch.load, pickle.loads, torch._C._pickle_load_obj = tensors, refuse, refuse
    try:
        yield
    finally:
        torch.load, pickle.loads, torch._C._pickle_load_obj = torch_load, loads, load_obj


def load_exported(source: str | Path | BinaryIO, origin: str | None = None) -> fx.GraphModule:
    """The model in `source` (a torch.export.save file or its bytes), as a module graph in eval mode; its
    `meta["input_shape"]` is the exported input's shape."""
    origin = origin or str(source)
    try:
        with _tensors_only():
            program = torch.export.load(source if not isinstance(source, Path) else str(source))
    except DFQFError as e:
        raise DFQFError(f"refusing the exported model {origin}: {e}") from None
    except Exception as e:  # noqa: BLE001 - not a .pt2 archive, truncated, another torch's format
        raise DFQFError(f"cannot read the exported model {origin}: {first_line(e)}") from None
    inputs = [s for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    if len(inputs) != 1:
        raise DFQFError(f"{origin}: the model must take one input (the images), it takes {len(inputs)}")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0].arg.name)
    try:
        gm = module_from_exported(program.module())
    except DFQFError as e:
        raise DFQFError(f"{origin}: {e}") from None
    gm.meta["input_shape"] = [int(d) for d in node.meta["val"].shape]
    return gm.eval()
