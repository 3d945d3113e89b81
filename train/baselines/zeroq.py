"""ZeroQ (Cai et al., CVPR 2020): distill calibration images from the teacher's BN statistics.

Starting from Gaussian noise, the images are optimized so that at every BatchNorm2d layer the batch
mean/std of its input match the stored running mean/std (plus the input itself matching N(0, 1)
per channel, as normalized images would). The student's ranges are then calibrated on them.
"""
from __future__ import annotations

import torch
from torch import nn

from ..losses import BNStatsHook


def distill_images(teacher: nn.Module, n: int, input_size: tuple[int, int, int], iterations: int = 500,
                   lr: float = 0.5, batch_size: int = 64, seed: int = 0, progress=None) -> torch.Tensor:  # noqa: ANN001
    """`n` distilled images (normalized input space) optimized batch by batch; teacher kept frozen."""
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    bn_stats = BNStatsHook(teacher)
    out = []
    grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(True)  # callers may hold torch.no_grad(); the images need gradients
    try:
        for start in range(0, n, batch_size):
            x = torch.randn((min(batch_size, n - start), *input_size), generator=g).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=50, min_lr=1e-4)
            for it in range(iterations):
                opt.zero_grad(set_to_none=True)
                teacher(x)
                input_term = (x.mean(dim=(0, 2, 3)) ** 2).mean() + ((x.std(dim=(0, 2, 3)) - 1) ** 2).mean()
                # ZeroQ sums over BN layers; the hook averages over the layers it recorded (and clears them)
                layers = len(bn_stats.records)
                loss = bn_stats.loss("zeroq") * layers + input_term
                loss.backward()
                opt.step()
                sched.step(loss.item())
                if progress is not None:
                    progress(start, it, loss.item())
            out.append(x.detach())
    finally:
        torch.set_grad_enabled(grad_mode)
        bn_stats.remove()
        for p in teacher.parameters():
            p.requires_grad_(True)
    return torch.cat(out)
