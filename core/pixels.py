"""The pixel contract every stage shares: uint8 NHWC images in, normalized float NCHW tensors out."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .errors import DFQFError


def normalize(x: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NHWC images -> float32 NCHW tensor (x / 255 - mean) / std, per channel.

    The result keeps the pixels' memory layout (NCHW indexing over channels-last memory, as
    `x.permute(0, 3, 1, 2)` gives); call `.contiguous()` for NCHW memory. The layout does not change any value,
    but it does choose torch's conv kernels, so DFQF's results depend on it (its training code uses this
    layout, its evaluation code the contiguous one).

    >>> normalize(np.full((1, 1, 1, 3), 255, np.uint8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).flatten().tolist()
    [1.0, 1.0, 1.0]
    """
    t = torch.as_tensor(x)
    if t.ndim != 4 or t.shape[-1] != len(mean) or len(mean) != len(std):
        raise DFQFError(f"normalize expects [N,H,W,{len(mean)}] images, got {list(t.shape)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    t = t.permute(0, 3, 1, 2).to(torch.float32)
    return (t / 255.0 - m) / s
