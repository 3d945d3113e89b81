"""The pooling kernels (`lower.schedules.x86_pool`) bit for bit against the NumPy reference, and the claim they
complete: no op of ResNet18/50 or MobileNetV2 runs on TVM's default loops (`tvm_build.default_loop_kernels`,
checked on the Relax module after the target's pipeline: no code is run, so every set is checked on any host)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_schedules import AVX2_CPU, requires_avx2, requires_vnni

from lower.schedules import x86_pool
from lower.tvm_build import default_loop_kernels
from toolkit import GraphMaker, all_ops_graph, assert_exact, randomize_bn

SETS = [pytest.param("x86_vnni", {}, marks=requires_vnni, id="vnni"),
        pytest.param("x86_avx2", {"mcpu": AVX2_CPU}, marks=requires_avx2, id="avx2")]
MCPU = {"x86_amx": "sapphirerapids", "x86_vnni": "cascadelake", "x86_avx2": AVX2_CPU}


def _pool_graph(op: str, dtype: str, hw: tuple[int, int], channels: int, kernel, stride, padding=(0, 0)):
    """conv (to `channels`) -> requantize (`dtype`) -> the pool -> requantize (for sum) ->  reshape -> dense."""
    pixels = np.random.default_rng(7).integers(0, 256, (2, *hw, 3), dtype=np.uint8)
    m = GraphMaker(3, pixels=pixels)
    m.conv("c", "q", channels)
    zp = -7 if dtype == "int8" else 9
    x = m.requantize("r", ["c"], dtype=dtype, zero_point=zp)
    if op == "max_pool2d":
        p = m.add(op, "pool", [x], {"kernel": list(kernel), "stride": list(stride), "padding": list(padding)})
    else:
        p = m.add(op, "pool", [x], {"kernel": list(kernel), "stride": list(stride)}, dtype="int32",
                  zero_point=zp * kernel[0] * kernel[1])
        p = m.requantize("rp", [p], per_channel=False, shifts=(36, 38))
    m.add("reshape", "flat", [p], {"shape": [-1]})
    m.dense("fc", "flat", 5)
    return m.graph()


@pytest.mark.parametrize("schedules,opts", SETS)
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("hw,channels,kernel,stride,padding", [
    ((9, 9), 64, (3, 3), (2, 2), (1, 1)),   # ResNet's stem pool: odd map, 64 lanes
    ((8, 7), 24, (3, 3), (2, 2), (1, 1)),   # 24 channels: 8 lanes
    ((7, 9), 3, (2, 3), (1, 2), (1, 0)),    # 3 channels: scalar; uneven window, stride and padding
    ((6, 6), 16, (2, 2), (2, 2), (0, 0)),
])
def test_max_pool_matches_reference(schedules, opts, dtype, hw, channels, kernel, stride, padding):
    g = _pool_graph("max_pool2d", dtype, hw, channels, kernel, stride, padding)
    assert default_loop_kernels(g, schedules=schedules, **opts) == []
    assert_exact(g, schedules=schedules, **opts)


@pytest.mark.parametrize("schedules,opts", SETS)
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("hw,channels,kernel,stride", [
    ((7, 7), 32, (7, 7), (7, 7)),   # global average pooling (ResNet18/50, MobileNetV2)
    ((8, 8), 64, (8, 8), (8, 8)),   # ResNet20's
    ((7, 5), 20, (3, 2), (2, 3)),   # uneven window and stride, 20 channels: 4 int32 lanes
])
def test_sum_pool_matches_reference(schedules, opts, dtype, hw, channels, kernel, stride):
    assert_exact(_pool_graph("sum_pool2d", dtype, hw, channels, kernel, stride), schedules=schedules, **opts)


def test_lanes_divide_the_channels():
    assert x86_pool.lanes_for(64, "uint8", 64) == 64
    assert x86_pool.lanes_for(24, "uint8", 64) == 8
    assert x86_pool.lanes_for(64, "int32", 64) == 16
    assert x86_pool.lanes_for(20, "int32", 32) == 4
    assert x86_pool.lanes_for(3, "uint8", 64) == 1
    with pytest.raises(ValueError, match="unknown pooling op"):
        x86_pool.pool_nhwc(None, "avg_pool2d", (4, 4, 4), "uint8", (2, 2), (2, 2))


def _int_graph(arch: str):
    """A calibrated W8A8 student of a seeded torchvision model, integerized at 64x64 (the ops of the 224 model,
    smaller maps)."""
    from lower.integerize import integerize
    from train.models import build_model, get_arch
    from train.quant.calibrate import calibrate
    from train.quant.convert import QuantConfig, quantize_model

    torch.manual_seed(0)
    student = quantize_model(randomize_bn(build_model(arch)).eval(), QuantConfig(8, 8, 8))
    calibrate(student, [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))], "minmax")
    info = get_arch(arch)
    return integerize(student, info.mean, info.std, (3, 64, 64))


# each model's distinctive kernels (MobileNetV2: depthwise, ReLU6, no max pool; ResNet18: the 7x7 stem, max pool,
# strided 1x1 shortcuts; ResNet50: bottleneck 1x1s) under the sets that schedule them differently (about 8 s
# per model and set: three models under all three would be a minute of the suite)
@pytest.mark.parametrize("arch,sets", [("mobilenet_v2", ("x86_amx", "x86_avx2")),
                                       ("resnet18", ("x86_amx", "x86_vnni", "x86_avx2")), ("resnet50", ("x86_amx",))])
def test_no_op_of_the_imagenet_models_runs_on_default_loops(arch, sets):
    g = _int_graph(arch)
    assert {n.op for n in g.nodes} >= {"sum_pool2d", "conv2d", "dense", "requantize"}
    assert arch == "mobilenet_v2" or "max_pool2d" in {n.op for n in g.nodes}
    for schedules in sets:
        assert default_loop_kernels(g, schedules=schedules, mcpu=MCPU[schedules]) == [], schedules
    if arch == "resnet18":  # the check can fail: without a set, every conv and pool is on default loops
        assert len(default_loop_kernels(g, schedules="none")) > 10


def test_the_check_names_what_stays_on_default_loops():
    """all_ops_graph's grouped (not depthwise) conv has no hand kernel; everything else in it has one."""
    left = default_loop_kernels(all_ops_graph(1), schedules="x86_vnni", mcpu=MCPU["x86_vnni"])
    assert len(left) == 1 and left[0].startswith("fused_conv2d"), left
