"""u8 x s8 -> s32 conv2d on Intel AMX (`tdpbusd` on 16 x 64-byte tiles), as a hand-written TIR kernel.

Same exact form, weight layout and Relax glue as `x86_vnni` (its `prepare`): acc = sum(u * w) - zp_u * sum(w)
+ bias with u the uint8 input (int8 inputs + 128) padded with zp_u; the packed weight [O/16, kh, kw, Cin/4, 16,
4] is already AMX's B-operand layout (16 output channels x 4 input bytes per 64-byte row).

The GEMM view. One `tdpbusd` multiplies an A tile of M <= 16 rows x K bytes (M output pixels, K input bytes) by
a B tile of K/4 rows x 64 bytes (K bytes x 16 output channels) into an int32 C tile of M x 16. For one kernel
row r, the taps s and input channels c of an output pixel are one contiguous run of kw * Cin bytes of the NHWC
input, so K runs over (s, c) in chunks of `k_chunk(kw * Cin)` bytes and the A rows are the output pixels,
`stride_w * Cin` bytes apart. With stride 1 the pixels run over the padded image as one flat sequence
(q = y * Wp + z; A row q starts at q * Cin + r * Wp * Cin): tiles span output rows, and the Wp - OW columns
between rows are computed and dropped (ResNet20's 8 x 8 maps use 16-row tiles at 80 % instead of 8-row tiles
at 50 %). Strided convs run one output row at a time. A last tile that would pass the end starts earlier and
recomputes a few pixels, so no tile reads outside the (padded) image and no tile-config change is needed.

Register blocking: `ma` A tiles x `nb` B tiles -> ma * nb accumulator tiles of the 8 tile registers (2 x 2:
four accumulators, two A, two B; 3 x 1 for an odd number of channel blocks). After the reduction over (r,
chunks) the accumulators go to a small int32 buffer and the epilogue (`x86_conv.requantize_value`, or the
plain int32 store) writes the valid pixels, vectorized over the channels (`_write_tile_group`: the per-channel
constants loaded into registers once per group, the pixels walked row by row; 32x32x16 at batch 16: 1.42x
faster than with the constants re-read and a division and branch per pixel).

Per parallel task (up to `IMAGES_PER_TASK` images; the tile configuration is per thread and `ldtilecfg` costs
about a thousand cycles): load the tile configuration, form each image's padded uint8 input in a scratch buffer
(only where the conv pads or converts), run the tile groups, release the tiles. The loop order follows the
weights: up to `WEIGHTS_OUTER_BYTES` they stay in L2 and the images are outermost (each padded just before
its tiles); beyond it (ResNet18's 512-channel 3x3 convs: 2.4 MB) the channel blocks are outermost, so each
block's weights are read once per task for all its images (7x7x512 at batch 16: 570 -> 910 GMAC/s).

The epilogue is what limits the small convs: on ResNet20's shapes the kernel without it ran 2.5-3.5x faster
(measured before `_write_tile_group` kept the constants in registers: the int64 requantize then cost ~1 cycle
per output against K / 1024 cycles of tile products). Issuing the next group's products before the previous
group's epilogue (software pipelining) measured no gain. Linux must have granted the process the AMX state
first (`core.isa.request_amx`; the runtime asks before it runs an AMX module).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..graph import Node, TensorInfo
from . import x86_conv, x86_vnni
from .x86_conv import ConvShape, Epilogue, KernelInputs

AMX_FEATURES = ("amx-int8", "amx-tile", "avx512vnni")  # the epilogue and the fallbacks use AVX-512
LANES = 16  # int32 columns of a C tile: output channels per block
TILE_ROWS = 16
TILE_BYTES = 64
IMAGES_PER_TASK = 4
MIN_K = 16  # below this many bytes per tile (the 3-channel first conv) the VNNI kernel is faster
MIN_ROWS = 4  # fewer output pixels per sequence (the dense layer: 1) leave most tile rows idle: VNNI instead
WEIGHTS_OUTER_BYTES = 1 << 20  # a conv's weights beyond this loop outside its images (`conv2d_nhwc_amx`)


def k_chunk(k: int) -> int:
    """Bytes of K per tile for a reduction run of k bytes (a multiple of 4): the largest multiple of 4 up to 64
    that divides k, so the chunks tile the run exactly and no tile reads past a pixel's taps."""
    return max(d for d in range(4, min(k, TILE_BYTES) + 1, 4) if k % d == 0)


def _pixels(shape: ConvShape) -> int:
    """Output pixels per sequence of A rows: the flat padded image (stride 1) or one output row."""
    (oh, ow), wp = shape.output_hw, shape.in_hw[1] + 2 * shape.padding[1]
    return (oh - 1) * wp + ow if shape.stride == (1, 1) else ow


def runs_on_amx(shape: ConvShape) -> bool:
    """Whether the AMX kernel takes this conv: dilation 1, at least `MIN_K` bytes per tile and `MIN_ROWS` pixels
    per sequence (the dense layer, a 1x1 conv on a 1x1 image, would use one row of each tile)."""
    return shape.dilation == (1, 1) and k_chunk(shape.kernel[1] * shape.cin) >= MIN_K and _pixels(shape) >= MIN_ROWS


def _blocking(out_blocks: int, pixels: int) -> tuple[int, int, int]:
    """(tile rows M, A tiles ma, B tiles nb) for `pixels` output pixels per sequence."""
    m = min(TILE_ROWS, pixels)
    nb = 2 if out_blocks % 2 == 0 else 1
    ma = max(1, min(2 if nb == 2 else 3, pixels // m))
    return m, ma, nb


def _config(m: int, ma: int, nb: int, kc: int) -> list[int]:
    """The 64-byte tile configuration (palette 1): accumulators 0..ma*nb-1 (m x 64 bytes), then ma A tiles (m x
    kc bytes), then nb B tiles (kc / 4 x 64 bytes)."""
    cfg = [0] * 64
    cfg[0] = 1
    shapes = [(m, TILE_BYTES)] * (ma * nb) + [(m, kc)] * ma + [(kc // 4, TILE_BYTES)] * nb
    for t, (rows, colsb) in enumerate(shapes):
        cfg[16 + 2 * t], cfg[17 + 2 * t], cfg[48 + t] = colsb & 0xFF, colsb >> 8, rows
    return cfg


def _amx(name: str, *args) -> None:
    T.evaluate(T.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def _tile(t: int):
    return tirx.const(t, "int8")


def conv2d_nhwc_amx(batch: tirx.Var, shape: ConvShape, epilogue: Epilogue | None = None,
                    tile: tuple[int, int] | None = None) -> tirx.PrimFunc:
    """The kernel, with `x86_vnni.conv2d_nhwc_u8s8`'s arguments and outputs. The tile blocking is fixed
    (`_blocking`; the family is not tunable), so `tile`, part of the family interface, must be None."""
    if tile is not None:
        raise ValueError(f"the AMX kernel's tile blocking is fixed; got tile {tile}")
    (kh, kw), (sh, sw) = shape.kernel, shape.stride
    (h, w), (ph, pw), c = shape.in_hw, shape.padding, shape.cin
    hp, wp = h + 2 * ph, w + 2 * pw
    oh, ow = shape.output_hw
    cout = shape.out_blocks * LANES
    kc = k_chunk(kw * c)
    nk = kw * c // kc
    flat = (sh, sw) == (1, 1)
    pixels = _pixels(shape)
    sequences = 1 if flat else oh
    m, ma, nb = _blocking(shape.out_blocks, pixels)
    a0, b0 = ma * nb, ma * nb + ma  # first A and B tile registers
    per_seq = ma * m
    n_tiles = -(-pixels // per_seq)
    n_ob = shape.out_blocks // nb
    weights_outer = shape.out_blocks * LANES * kh * kw * c > WEIGHTS_OUTER_BYTES
    scratch = (ph, pw) != (0, 0) or shape.in_dtype != "uint8"
    cfg_bytes = _config(m, ma, nb, kc)

    with IRBuilder() as ib:
        with T.prim_func(s_tir=False):
            T.func_name("conv2d_nhwc_amx")
            T.func_attr({"tirx.noalias": True})
            x = T.arg("x", T.buffer((batch, h, w, c), shape.in_dtype))
            zp = T.arg("zero_point", T.buffer((1,), "int32"))
            wt = T.arg("w", T.buffer((shape.out_blocks, kh, kw, c // 4, LANES, 4), "int8"))
            if epilogue is not None:
                mult = T.arg("multiplier", T.buffer((1 + len(epilogue.residual_dtypes), cout), "int32"))
                offset = T.arg("offset", T.buffer((cout,), "int64"))
                shift = T.arg("shift", T.buffer((cout,), "int64"))
                res = [T.arg(f"residual{i}", T.buffer((batch, oh, ow, cout), dt))
                       for i, dt in enumerate(epilogue.residual_dtypes)]
            out = T.arg("out", T.buffer((batch, oh, ow, cout), "int32" if epilogue is None else epilogue.dtype))
            epilogue_args = None if epilogue is None else (epilogue, mult, offset, shift, res)
            xf = T.decl_buffer((batch * h * w * c,), shape.in_dtype, data=x.data)
            wf = T.decl_buffer((shape.out_blocks * kh * kw * c * LANES,), "int8", data=wt.data)
            with T.parallel(0, (batch + IMAGES_PER_TASK - 1) // IMAGES_PER_TASK) as task:
                cfg = T.alloc_buffer((64,), "uint8", scope="local")
                for i, v in enumerate(cfg_bytes):
                    T.buffer_store(cfg, tirx.const(v, "uint8"), [i])
                _amx("ldtilecfg", T.address_of(cfg[0]))
                acc = T.alloc_buffer((per_seq, nb * LANES), "int32", scope="local")
                image = hp * wp * c  # bytes of one padded image
                pad = T.alloc_buffer(((IMAGES_PER_TASK if weights_outer else 1) * image,), "uint8") if scratch else None
                n0 = task * IMAGES_PER_TASK
                count = T.min(IMAGES_PER_TASK, batch - n0)
                if scratch and weights_outer:
                    with T.serial(0, count) as li:
                        _fill_padded(pad, x, zp, n0 + li, li * image, shape)
                src = pad if scratch else xf

                def tile_group(n, seq, t, obo):
                    """The tile group of image n, sequence seq, pixel tile t, channel-block group obo."""
                    qs = T.min(t * per_seq, pixels - per_seq)
                    base = ((n - n0) * image if weights_outer else 0) if scratch else n * (h * w * c)
                    for i in range(ma * nb):
                        _amx("tilezero", _tile(i))
                    with T.serial(0, kh) as r:
                        with T.serial(0, nk) as kk:
                            row = base + (seq * sh + r) * (wp * c) + kk * kc
                            for i in range(ma):
                                _amx("tileloadd64", _tile(a0 + i), T.address_of(src[row + (qs + i * m) * (sw * c)]),
                                     tirx.const(sw * c, "int64"))
                            for j in range(nb):
                                off = ((obo * nb + j) * kh + r) * (kw * c * LANES) + kk * (kc * LANES)
                                _amx("tileloadd64", _tile(b0 + j), T.address_of(wf[off]),
                                     tirx.const(TILE_BYTES, "int64"))
                            for i in range(ma):
                                for j in range(nb):
                                    _amx("tdpbusd", _tile(i * nb + j), _tile(a0 + i), _tile(b0 + j))
                    for i in range(ma):
                        for j in range(nb):
                            _amx("tilestored64", _tile(i * nb + j), T.address_of(acc[i * m, j * LANES]),
                                 tirx.const(nb * LANES * 4, "int64"))
                    _write_tile_group(acc, out, n, seq, qs, obo, epilogue_args, shape, flat, per_seq, nb)

                # Weights of more than WEIGHTS_OUTER_BYTES (beyond L2): channel blocks outermost, each block's
                # weights read once per task for all its images; else images outermost, each padded as its
                # tiles start (so it is still in cache for them).
                if weights_outer:
                    with T.serial(0, n_ob) as obo, T.serial(0, count) as li:
                        with T.serial(0, sequences) as seq, T.serial(0, n_tiles) as t:
                            tile_group(n0 + li, seq, t, obo)
                else:
                    with T.serial(0, count) as li:
                        if scratch:
                            _fill_padded(pad, x, zp, n0 + li, 0, shape)
                        with T.serial(0, sequences) as seq, T.serial(0, n_tiles) as t:
                            with T.serial(0, n_ob) as obo:
                                tile_group(n0 + li, seq, t, obo)
                _amx("tilerelease")
    return ib.get()


def _write_tile_group(acc, out, n, seq, qs, obo, epilogue_args, shape: ConvShape, flat: bool, per_seq: int,
                      nb: int) -> None:
    """Write the tile group's accumulators acc [per_seq, nb * 16] (pixels qs.. of sequence seq, channels of block
    group obo): the valid output pixels, requantized when there is an epilogue. The per-channel constants are
    read once per group into registers, and the pixels are walked row by row (no division, no branch per
    pixel)."""
    (oh, ow), wp = shape.output_hw, shape.in_hw[1] + 2 * shape.padding[1]
    width = nb * LANES
    ch0 = obo * width
    if epilogue_args is not None:
        e, mult, offset, shift, res = epilogue_args
        consts = []
        for k, (src, dtype) in enumerate([(mult, "int32")] * (1 + len(res)) + [(offset, "int64"), (shift, "int64")]):
            buf = T.alloc_buffer((width,), dtype, scope="local")
            with T.vectorized(0, width) as cc:
                T.buffer_store(buf, src[k, ch0 + cc] if k <= len(res) else src[ch0 + cc], [cc])
            consts.append(buf)
        *mults, off, sh = consts

    def write(p, y, z):
        with T.vectorized(0, width) as cc:
            v = acc[p, cc]
            if epilogue_args is not None:
                v = x86_conv.requantize_value(v, [m[cc] for m in mults], [rt[n, y, z, ch0 + cc] for rt in res],
                                              off[cc], sh[cc], e)
            T.buffer_store(out, v, [n, y, z, ch0 + cc])

    if not flat:
        with T.serial(0, per_seq) as p:
            write(p, seq, qs + p)
        return
    # the flat pixels qs .. qs + per_seq - 1 cover output rows y0 .. y0 + rows - 1 (partly)
    rows = -(-(per_seq - 1) // wp) + 1
    with T.serial(0, rows) as dy:
        y = qs // wp + dy
        with T.If(y < oh):
            with T.Then():
                z0 = T.max(qs - y * wp, 0)
                with T.serial(z0, T.min(qs + per_seq - y * wp, ow)) as z:
                    write(y * wp + z - qs, y, z)


def _fill_padded(pad, x, zp, n, base, shape: ConvShape) -> None:
    """pad[base + (i * Wp + j) * C + c] = u of x[n, i - ph, j - pw, c] inside the image, zp_u in the padding."""
    (h, w), (ph, pw), c = shape.in_hw, shape.padding, shape.cin
    hp, wp = h + 2 * ph, w + 2 * pw
    fill = zp[0].astype("uint8")
    with T.serial(0, hp) as i:
        with T.serial(0, wp) as j:
            with T.If(tirx.all(i >= ph, i < h + ph, j >= pw, j < w + pw)):
                with T.Then():
                    with T.vectorized(0, c) as cc:
                        v = x[n, i - ph, j - pw, cc]
                        if shape.in_dtype != "uint8":  # the bit pattern with its sign bit flipped
                            v = (v.astype("int16") + tirx.const(128, "int16")).astype("uint8")
                        T.buffer_store(pad, v, [base + (i * wp + j) * c + cc])
                with T.Else():
                    with T.vectorized(0, c) as cc:
                        T.buffer_store(pad, fill, [base + (i * wp + j) * c + cc])


def _prepare(b, node: Node, x, in_info: TensorInfo | None = None) -> KernelInputs | None:
    """`x86_vnni`'s kernel inputs, for the convs the AMX kernel takes (`runs_on_amx`)."""
    k = x86_vnni.FAMILY.prepare(b, node, x, in_info)
    return k if k is not None and runs_on_amx(k.shape) else None


FAMILY = x86_conv.Family(_prepare, conv2d_nhwc_amx, LANES, "conv2d_amx", 4, tunable=False)
