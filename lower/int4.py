"""Two 4-bit values per byte (TVM 0.27 and NumPy have no packed int4 storage; DESIGN §4, §6).

Layout: the C-order flattened tensor, element 2i in the low nibble and 2i+1 in the high nibble of byte i;
an odd count is padded with 0. Signed values are 4-bit two's complement, unsigned values 0..15.
"""
from __future__ import annotations

import numpy as np

from core.errors import DFQFError


def pack_int4(values: np.ndarray, signed: bool = True) -> np.ndarray:
    """Flat uint8 array of ceil(size / 2) bytes.

    >>> pack_int4(np.array([1, -2, 7]), signed=True).tolist()
    [225, 7]
    """
    v = np.asarray(values).astype(np.int64).ravel()
    lo, hi = (-8, 7) if signed else (0, 15)
    if v.size and (v.min() < lo or v.max() > hi):
        raise DFQFError(f"values outside the {'signed' if signed else 'unsigned'} 4-bit range: [{v.min()}, {v.max()}]")
    nib = (v & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...], signed: bool = True) -> np.ndarray:
    """Inverse of `pack_int4`, as int8 of `shape`.

    >>> unpack_int4(np.array([225, 7], np.uint8), (3,)).tolist()
    [1, -2, 7]
    """
    b = np.asarray(packed, dtype=np.uint8).ravel()
    n = int(np.prod(shape))
    if b.size != (n + 1) // 2:
        raise DFQFError(f"{b.size} packed bytes cannot hold a {list(shape)} int4 tensor")
    nib = np.empty(b.size * 2, dtype=np.int16)
    nib[0::2], nib[1::2] = b & 0xF, b >> 4
    if signed:
        nib = np.where(nib >= 8, nib - 16, nib)
    return nib[:n].astype(np.int8).reshape(shape)
