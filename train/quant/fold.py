"""Batch-norm folding as a pure graph transformation (applied before quantization, DESIGN §3)."""
from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolic trace of a teacher, in eval mode (folding and quantization use BN running stats)."""
    return fx.symbolic_trace(copy.deepcopy(model).eval())


def conv_bn_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(conv, bn) module names where a BatchNorm2d consumes a Conv2d output that nothing else uses."""
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(gm.get_submodule(src.target), nn.Conv2d)):
            pairs.append((src.target, node.target))
    return pairs


def fold_batch_norm(model: nn.Module) -> fx.GraphModule:
    """Return a new traced graph in which every Conv2d→BatchNorm2d pair is one Conv2d with bias.

    y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta  =  conv'(x) with
    W' = W * gamma / sqrt(var + eps) per output channel and b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    The input model is not modified.
    """
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    gm = copy.deepcopy(gm).eval()
    for conv_name, bn_name in conv_bn_pairs(gm):
        conv, bn = gm.get_submodule(conv_name), gm.get_submodule(bn_name)
        _set_submodule(gm, conv_name, fuse_conv_bn_eval(conv, bn))
        bn_node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == bn_name)
        bn_node.replace_all_uses_with(bn_node.args[0])
        gm.graph.erase_node(bn_node)
        _set_submodule(gm, bn_name, nn.Identity())  # keep the module tree shape, drop BN state
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)
