"""ZeroQ (Cai et al., CVPR 2020): distill calibration images from the teacher's BN statistics.

Starting from Gaussian noise, the images are optimized so that at every BatchNorm2d layer the batch
mean/std of its input match the stored running mean/std (plus the input itself matching N(0, 1)
per channel, as normalized images would). The student's ranges are then calibrated on them.
"""
from __future__ import annotations

import torch
from torch import nn


class BNStatsLoss:
    """Forward hooks on every BatchNorm2d: sum of ||mu_batch - mu||^2 / C + ||sigma_batch - sigma||^2 / C."""

    def __init__(self, model: nn.Module) -> None:
        self.terms: list[torch.Tensor] = []
        self.hooks = [m.register_forward_pre_hook(self._hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.hooks:
            raise ValueError("the model has no BatchNorm2d layer to take statistics from")

    def _hook(self, bn: nn.BatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        mean = x.mean(dim=(0, 2, 3))
        std = torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False) + bn.eps)
        c = x.shape[1]
        self.terms.append(((mean - bn.running_mean) ** 2).sum() / c
                          + ((std - torch.sqrt(bn.running_var + bn.eps)) ** 2).sum() / c)

    def pop(self) -> torch.Tensor:
        loss = torch.stack(self.terms).sum()
        self.terms = []
        return loss

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def distill_images(teacher: nn.Module, n: int, input_size: tuple[int, int, int], iterations: int = 500,
                   lr: float = 0.5, batch_size: int = 64, seed: int = 0, progress=None) -> torch.Tensor:  # noqa: ANN001
    """`n` distilled images (normalized input space) optimized batch by batch; teacher kept frozen."""
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    loss_fn = BNStatsLoss(teacher)
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
                loss = loss_fn.pop() + input_term
                loss.backward()
                opt.step()
                sched.step(loss.item())
                if progress is not None:
                    progress(start, it, loss.item())
            out.append(x.detach())
    finally:
        torch.set_grad_enabled(grad_mode)
        loss_fn.remove()
        for p in teacher.parameters():
            p.requires_grad_(True)
    return torch.cat(out)
