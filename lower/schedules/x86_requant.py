"""The requantize fused into the conv kernels as their epilogue (`x86_conv`, `x86_vnni`, `x86_depthwise`,
`x86_avx2`, `x86_amx`), and the int32-tail form of it as a tensor intrinsic for the VNNI, AVX2 and depthwise
kernels.

Epilogue arithmetic. The requantize is y = clamp(zp_out + ((sum_i (t_i - zp_i) * M_i + offset + 2^(n-1)) >> n))
in int64 (`lower.reference`). The conv term is t_0 = a + b, the kernel's int32 dot product a plus its
(corrected) bias b. The kernel computes ((a * M_0 + sum_{i>0} t_i * M_i + offset') >> n) + zp_out with
offset' = offset + 2^(n-1) - sum_i zp_i * M_i + b * M_0 folded per channel into one int64 constant by the Relax
glue (`x86_conv.emit_conv2d_requantize`; parameter-only work, done once). Both sides are the same integer: int64
addition and multiplication are exact modulo 2^64 and the final sum is in range
(`lower.integerize.joint_dyadic` bounds it), so the order of the terms cannot change the result. Every
multiplied value is 32 bits wide (a, or an 8-bit activation) and every M_i < 2^31 (`joint_dyadic`), stored as
int32, so LLVM multiplies with vpmuldq (32 x 32 -> 64 bits) instead of a full 64 x 64 vpmullq. (With the bias
added to a in the kernel, LLVM widened a and b separately, lost the 32-bit bound and used vpmullq.)

The int32 tail (`Epilogue.hi32`: every shift n >= 32, in a family that takes it: the VNNI, AVX2 and depthwise
convs):
y = clamp((total >> 32) >> (n - 32)) + zp with everything after the first shift in int32:
floor(floor(x / 2^32) / 2^(n-32)) = floor(x / 2^n), the high dword is exact because |total| < 2^63, and the
clamp to [qmin - zp, qmax - zp] comes before the + zp, so nothing overflows int32. Left to LLVM, the int64 form
costs about 17 instructions per 16 outputs: the int32 accumulator is split into two ymm halves and
zero-extended (3), multiplied (2 vpmuldq), offset (2), shifted (2 vpsravq), clamped in int64 (4) and narrowed
in two halves (3). The intrinsic:

- multiplies the even and the odd int32 lanes in place: vpmuldq reads the low dword of each qword (the even
  lanes as they are; the odd ones after one vpsrlq), so nothing is extracted or extended;
- adds offset' (its even and odd halves: one vpermt2q each per register tile);
- takes the high dwords of both sums in channel order with one vpermt2d, shifts by n - 32 (vpsravd), clamps
  in int32 and narrows: about 11 instructions, the same integers bit for bit (tests/test_requant_epilogue.py).
  With 8 lanes (AVX2) the same expression needs no 64-bit arithmetic shift, which AVX2 lacks and LLVM
  emulates in the int64 form (vpcmpgtq, vpsrlvq, vblendvpd per half).

Measured (b16, one thread, Zen 4): the 1x1 convs with 24-32 input channels 1.18-1.27x faster, the others
1.01-1.07x. The AVX2 conv (Haswell code, same host): 1.25-1.27x on those 1x1 convs, 1.03-1.09x on ResNet20-like
3x3 convs with a residual, 0.96-1.05x on the others. The depthwise kernel (MobileNetV2's ten 3x3 shapes, side
by side against its int64 form): 1.01-1.12x with 16 lanes, 1.18-1.47x with 8 (AVX2). The int32 form left to
LLVM's vectorizer (trunc of the shifted int64 lanes) gained nothing: LLVM narrows with vpsrlq + vpmovqd +
vinserti64x4.

Its description is `requantize_value` itself, the expression of the kernel's "requantize" block (tensorize
matches it structurally), for zero or one residual term.
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T


@dataclass(frozen=True)
class Epilogue:
    """A requantize applied to the conv accumulator inside the kernel.

    residual_dtypes: one per residual input (uint8/int8 [batch, OH, OW, C]); the rest are the requantize's
    attributes. The zero points of the terms are folded into the offset (module docstring)."""

    residual_dtypes: tuple[str, ...]
    output_zero_point: int
    qmin: int
    qmax: int
    dtype: str
    hi32: bool = False  # every shift >= 32: the int32 tail (module docstring)


def requantize_epilogue(conv: te.Tensor, e: Epilogue, batch, oh: int, ow: int, lanes: int
                        ) -> tuple[te.Tensor, list[te.Tensor]]:
    """The requantized output of conv [batch, OH, OW, C / lanes, lanes] and its extra inputs: multiplier int32
    [1 + R, C] (the conv term's row first), offset int64 [C] (offset' of the module docstring, the bias
    included), shift int64 [C] and the R residuals."""
    c = conv.shape[3] * lanes
    mult = te.placeholder((1 + len(e.residual_dtypes), c), "int32", name="multiplier")
    offset = te.placeholder((c,), "int64", name="offset")
    shift = te.placeholder((c,), "int64", name="shift")
    res = [te.placeholder((batch, oh, ow, c), dt, name=f"residual{i}") for i, dt in enumerate(e.residual_dtypes)]

    def requantize(n, y, z, ch):
        return requantize_value(conv[n, y, z, ch // lanes, ch % lanes], [mult[i, ch] for i in range(1 + len(res))],
                                [rt[n, y, z, ch] for rt in res], offset[ch], shift[ch], e)

    return te.compute((batch, oh, ow, c), requantize, name="requantize"), [mult, offset, shift, *res]


def requantize_value(acc: tirx.PrimExpr, mults: list[tirx.PrimExpr], residuals: list[tirx.PrimExpr],
                     offset: tirx.PrimExpr, shift: tirx.PrimExpr, e: Epilogue) -> tirx.PrimExpr:
    """The epilogue's output for the kernel's int32 dot product `acc`, the residual values and one channel's
    constants: int32 multipliers (the conv term's first), int64 offset' and shift (module docstring):
    clamp(((acc * M_0 + sum_i t_i * M_i + offset') >> shift) + zp_out), in `e.dtype`."""
    total = acc.astype("int64") * mults[0].astype("int64") + offset
    for t, m in zip(residuals, mults[1:]):
        total = total + t.astype("int64") * m.astype("int64")
    if e.hi32:
        zp = e.output_zero_point
        # (shift - 32) subtracted in int64: TVM 0.27's bound of int32 `x >> (int32(s) - 32)` is [-1, 0] (the
        # subtraction's bound overflows), and the simplifier then folded the whole epilogue to a constant
        q = (total >> tirx.const(32, "int64")).astype("int32") >> (shift - tirx.const(32, "int64")).astype("int32")
        q = tirx.max(tirx.min(q, tirx.const(e.qmax - zp, "int32")), tirx.const(e.qmin - zp, "int32"))
        return (q + tirx.const(zp, "int32")).astype(e.dtype)
    q = (total >> shift) + tirx.const(e.output_zero_point, "int64")
    return tirx.max(tirx.min(q, tirx.const(e.qmax, "int64")), tirx.const(e.qmin, "int64")).astype(e.dtype)


def epilogue_intrinsic(e: Epilogue | None, lanes: int) -> str | None:
    """The intrinsic for the epilogue `e` of a kernel with `lanes` int32 lanes (16: AVX-512, 8: AVX2), or None
    (no epilogue, or not `e.hi32`: the schedule vectorizes `requantize_value` instead)."""
    return intrinsic(e, lanes) if e is not None and e.hi32 else None


def _split(v, lanes: int):
    """int32 x lanes -> (even lanes, odd lanes) as sign-extended int64 x lanes/2 (vpmuldq reads the low dwords)."""
    half = lanes // 2
    w = T.reinterpret(v, dtype=f"int64x{half}")
    return (w << T.Broadcast(T.int64(32), half)) >> T.Broadcast(T.int64(32), half), w >> T.Broadcast(T.int64(32), half)


def _vector(A, M, O, S, R, e: Epilogue, lanes: int):
    """The intrinsic's `lanes` outputs as one vector expression of its buffers (acc A, multipliers M [1 + R,
    lanes], offset' O, shift S, residuals R; no named intermediates: TVM 0.27 gives every vector-typed binding
    of a TVMScript body its own workspace allocation, which kept LLVM from holding the tile in registers)."""
    zp, half, i32, i64 = e.output_zero_point, lanes // 2, f"int32x{lanes}", f"int64x{lanes // 2}"
    terms = [(A.vload([0], dtype=i32), M.vload([0, 0] if R else [0], dtype=i32))]
    terms += [(T.Cast(i32, r.vload([0], dtype=f"{r.dtype}x{lanes}")), M.vload([1 + i, 0], dtype=i32))
              for i, r in enumerate(R)]
    o0, o1 = O.vload([0], dtype=i64), O.vload([half], dtype=i64)
    se, so = T.Shuffle([o0, o1], list(range(0, lanes, 2))), T.Shuffle([o0, o1], list(range(1, lanes, 2)))
    for t, m in terms:
        (te_, to), (me, mo) = _split(t, lanes), _split(m, lanes)
        se, so = se + te_ * me, so + to * mo
    # lane 2k: the high dword of even sum k (dword 2k + 1 of se), lane 2k + 1: that of odd sum k
    high = [j for k in range(half) for j in (2 * k + 1, lanes + 2 * k + 1)]
    hi = T.Shuffle([T.reinterpret(se, dtype=i32), T.reinterpret(so, dtype=i32)], high)
    s0, s1 = S.vload([0], dtype=i64), S.vload([half], dtype=i64)
    n = T.Cast(i32, T.Shuffle([s0, s1], list(range(lanes))) - T.Broadcast(T.int64(32), lanes))
    q = T.max(T.min(hi >> n, T.Broadcast(T.int32(e.qmax - zp), lanes)), T.Broadcast(T.int32(e.qmin - zp), lanes))
    return T.Cast(f"{e.dtype}x{lanes}", q + T.Broadcast(T.int32(zp), lanes))


def _plain(e: Epilogue, lanes: int, vector: bool):
    """The description (vector=False: the scalar block tensorize matches) or the implementation, no residual."""
    dt, L = e.dtype, lanes

    @T.prim_func(s_tir=True)
    def func(A: T.Buffer((L,), "int32", offset_factor=1, scope="local"),
             M: T.Buffer((L,), "int32", offset_factor=1), O: T.Buffer((L,), "int64", offset_factor=1),
             S: T.Buffer((L,), "int64", offset_factor=1), Y: T.Buffer((L,), dt, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(A[0:L], M[0:L], O[0:L], S[0:L])
            T.writes(Y[0:L])
            if vector:
                Y[T.ramp(T.int32(0), 1, L)] = _vector(A, M, O, S, [], e, L)
            else:
                for i in T.serial(0, L):
                    with T.sblock("requantize"):
                        vi = T.axis.remap("S", [i])
                        Y[vi] = requantize_value(A[vi], [M[vi]], [], O[vi], S[vi], e)

    return func


def _residual(e: Epilogue, lanes: int, vector: bool):
    """The same with one residual term R (multipliers M [2, lanes]: the conv term's row, then R's)."""
    dt, rt, L = e.dtype, e.residual_dtypes[0], lanes

    @T.prim_func(s_tir=True)
    def func(A: T.Buffer((L,), "int32", offset_factor=1, scope="local"),
             M: T.Buffer((2, L), "int32", strides=[T.int32(), 1], offset_factor=1),
             O: T.Buffer((L,), "int64", offset_factor=1), S: T.Buffer((L,), "int64", offset_factor=1),
             R: T.Buffer((L,), rt, offset_factor=1), Y: T.Buffer((L,), dt, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(A[0:L], M[0:2, 0:L], O[0:L], R[0:L], S[0:L])
            T.writes(Y[0:L])
            if vector:
                Y[T.ramp(T.int32(0), 1, L)] = _vector(A, M, O, S, [R], e, L)
            else:
                for i in T.serial(0, L):
                    with T.sblock("requantize"):
                        vi = T.axis.remap("S", [i])
                        Y[vi] = requantize_value(A[vi], [M[0, vi], M[1, vi]], [R[vi]], O[vi], S[vi], e)

    return func


def intrinsic(e: Epilogue, lanes: int) -> str:
    """The name of the epilogue intrinsic for `e` (hi32, at most one residual) over `lanes` (16 or 8) int32
    lanes, registered once per process."""
    if len(e.residual_dtypes) > 1 or lanes not in (8, 16):
        raise ValueError("the hi32 epilogue takes at most one residual term, over 8 or 16 lanes")
    zp, res = e.output_zero_point, "_".join(e.residual_dtypes) or "none"
    name = f"dfqf_requantize{lanes}_hi32_{res}_{e.dtype}_zp{zp}_{e.qmin}_{e.qmax}".replace("-", "m")
    if TensorIntrin.get(name, allow_missing=True) is None:
        build = _residual if e.residual_dtypes else _plain
        TensorIntrin.register(name, build(e, lanes, False), build(e, lanes, True))
    return name
