"""The fused requantize epilogue of the AVX-512 kernels (`x86_vnni`, `x86_depthwise`) as a tensor intrinsic:
16 output channels of one pixel per call, with the even/odd int64 lanes written out.

The requantizer is y = clamp(((sum_i t_i * M_i + offset') >> n) + zp_out) in int64 (`x86_conv.requantize_value`).
Left to LLVM, the 16 int64 lanes cost about 17 instructions per 16 outputs: the int32 accumulator is split
into two ymm halves and zero-extended (3), multiplied (2 vpmuldq), offset (2), shifted (2 vpsravq), clamped in
int64 (4) and narrowed in two halves (3). This intrinsic, used where every shift n >= 32 (`Epilogue.hi32`):

- multiplies the even and the odd int32 lanes in place: vpmuldq reads the low dword of each qword (the even
  lanes as they are; the odd ones after one vpsrlq), so nothing is extracted or extended;
- adds offset' (its even and odd halves are shuffled once per kernel: loop-invariant);
- takes the high dwords of both products in channel order with one vpermt2d: floor(total / 2^32), exact in
  int32 because |total| < 2^63; then shifts by n - 32 in int32 (vpsravd): floor(floor(x / 2^32) / 2^(n-32))
  = floor(x / 2^n), the reference's arithmetic shift;
- clamps in int32 to [qmin - zp, qmax - zp], adds zp (no int32 overflow: the clamped value is within 8 bits)
  and narrows: about 11 instructions, the same integers bit for bit (tests/test_schedules.py).

The description is the scalar expression `x86_conv.requantize_value` builds for the kernel's "requantize" block
(tensorize matches it structurally), for zero or one residual term.
"""
from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .x86_conv import Epilogue

LANES = 16
EVEN = [2 * i for i in range(8)]
ODD = [2 * i + 1 for i in range(8)]
HIGH_DWORDS = [j for i in range(8) for j in (2 * i + 1, 16 + 2 * i + 1)]  # (even_k, odd_k) high dwords in order


def epilogue_intrinsic(e: Epilogue | None) -> str | None:
    """The intrinsic for a 16-lane kernel's epilogue `e`, or None (no epilogue, or not `e.hi32`: the schedule
    vectorizes `x86_conv.requantize_value` instead)."""
    return intrinsic(e) if e is not None and e.hi32 else None


def _split(v):
    """int32x16 -> (even lanes, odd lanes) as sign-extended int64x8 (vpmuldq reads the low dwords)."""
    w = T.reinterpret(v, dtype="int64x8")
    return (w << T.Broadcast(T.int64(32), 8)) >> T.Broadcast(T.int64(32), 8), w >> T.Broadcast(T.int64(32), 8)


def _halves(buf):
    """An int64 [16] buffer as its (even, odd) lanes, int64x8 each."""
    lo, hi = buf.vload([0], dtype="int64x8"), buf.vload([8], dtype="int64x8")
    return T.Shuffle([lo, hi], EVEN), T.Shuffle([lo, hi], ODD)


def _tail(se, so, S, e: Epilogue):
    """clamp((high dwords of (se, so)) >> (S - 32), qmin - zp, qmax - zp) + zp, in e.dtype x 16."""
    zp = e.output_zero_point
    hi = T.Shuffle([T.reinterpret(se, dtype="int32x16"), T.reinterpret(so, dtype="int32x16")], HIGH_DWORDS)
    s0, s1 = S.vload([0], dtype="int64x8"), S.vload([8], dtype="int64x8")
    n = T.Cast("int32x16", T.Shuffle([s0, s1], list(range(16))) - T.Broadcast(T.int64(32), 16))
    q = T.max(T.min(hi >> n, T.Broadcast(T.int32(e.qmax - zp), 16)), T.Broadcast(T.int32(e.qmin - zp), 16))
    return T.Cast(f"{e.dtype}x16", q + T.Broadcast(T.int32(zp), 16))


def _plain(e: Epilogue):
    zp, lo, hi, dt = e.output_zero_point, e.qmin - e.output_zero_point, e.qmax - e.output_zero_point, e.dtype

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
             M: T.Buffer((16,), "int32", offset_factor=1), O: T.Buffer((16,), "int64", offset_factor=1),
             S: T.Buffer((16,), "int64", offset_factor=1), Y: T.Buffer((16,), dt, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(A[0:16], M[0:16], O[0:16], S[0:16])
            T.writes(Y[0:16])
            for i in T.serial(0, 16):
                with T.sblock("requantize"):
                    vi = T.axis.remap("S", [i])
                    Y[vi] = T.Cast(dt, T.max(T.min(T.Cast("int32", T.Cast("int64", A[vi]) * T.Cast("int64", M[vi])
                                                          + O[vi] >> T.int64(32)) >> T.Cast("int32", S[vi] - T.int64(32)),
                                                   hi), lo) + zp)

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
             M: T.Buffer((16,), "int32", offset_factor=1), O: T.Buffer((16,), "int64", offset_factor=1),
             S: T.Buffer((16,), "int64", offset_factor=1), Y: T.Buffer((16,), dt, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(A[0:16], M[0:16], O[0:16], S[0:16])
            T.writes(Y[0:16])
            ae, ao = _split(A.vload([0], dtype="int32x16"))
            me, mo = _split(M.vload([0], dtype="int32x16"))
            oe, oo = _halves(O)
            Y[T.ramp(T.int32(0), 1, 16)] = _tail(ae * me + oe, ao * mo + oo, S, e)

    return desc, impl


def _residual(e: Epilogue):
    zp, lo, hi, dt, rt = (e.output_zero_point, e.qmin - e.output_zero_point, e.qmax - e.output_zero_point, e.dtype,
                          e.residual_dtypes[0])

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
             M: T.Buffer((2, 16), "int32", strides=[T.int32(), 1], offset_factor=1),
             O: T.Buffer((16,), "int64", offset_factor=1), S: T.Buffer((16,), "int64", offset_factor=1),
             R: T.Buffer((16,), rt, offset_factor=1), Y: T.Buffer((16,), dt, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(A[0:16], M[0:2, 0:16], O[0:16], R[0:16], S[0:16])
            T.writes(Y[0:16])
            for i in T.serial(0, 16):
                with T.sblock("requantize"):
                    vi = T.axis.remap("S", [i])
                    Y[vi] = T.Cast(dt, T.max(T.min(T.Cast("int32", T.Cast("int64", A[vi]) * T.Cast("int64", M[0, vi])
                                                          + O[vi] + T.Cast("int64", R[vi]) * T.Cast("int64", M[1, vi])
                                                          >> T.int64(32)) >> T.Cast("int32", S[vi] - T.int64(32)),
                                                   hi), lo) + zp)

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
             M: T.Buffer((2, 16), "int32", strides=[T.int32(), 1], offset_factor=1),
             O: T.Buffer((16,), "int64", offset_factor=1), S: T.Buffer((16,), "int64", offset_factor=1),
             R: T.Buffer((16,), rt, offset_factor=1), Y: T.Buffer((16,), dt, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(A[0:16], M[0:2, 0:16], O[0:16], R[0:16], S[0:16])
            T.writes(Y[0:16])
            ae, ao = _split(A.vload([0], dtype="int32x16"))
            me, mo = _split(M.vload([0, 0], dtype="int32x16"))
            re, ro = _split(T.Cast("int32x16", R.vload([0], dtype=f"{rt}x16")))
            ne, no = _split(M.vload([1, 0], dtype="int32x16"))
            oe, oo = _halves(O)
            Y[T.ramp(T.int32(0), 1, 16)] = _tail(ae * me + oe + re * ne, ao * mo + oo + ro * no, S, e)

    return desc, impl


def intrinsic(e: Epilogue) -> str:
    """The name of the epilogue intrinsic for `e` (hi32, at most one residual), registered once per process."""
    if len(e.residual_dtypes) > 1:
        raise ValueError("the hi32 epilogue takes at most one residual term")
    zp, res = e.output_zero_point, "_".join(e.residual_dtypes) or "none"
    name = f"dfqf_requantize16_hi32_{res}_{e.dtype}_zp{zp}_{e.qmin}_{e.qmax}".replace("-", "m")
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *(_residual(e) if e.residual_dtypes else _plain(e)))
    return name
