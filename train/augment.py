"""Image augmentation of normalized NCHW batches (DeepInversion-style jitter of G's images, KD-time views)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def flip_and_shift(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a batch: random horizontal flip, then a random crop of the
    reflection-padded image (a shift of up to `pad` pixels), drawn per image from `g`."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
