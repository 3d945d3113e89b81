"""Generator G: noise (+ class label) → image at the teacher's input size and normalization.

DCGAN-style: a linear layer to a base_channels × init × init map, then [upsample ×2 → conv3x3 → BN →
LeakyReLU] stages (channels halve, never below max(32, base_channels / 4): 128 → 64 → 32 → 32 for the
default width at 32×32) up to the teacher's resolution, a conv to RGB and a sigmoid, so G's raw output is
a valid image in [0, 1] that can be stored as uint8; `forward` applies the teacher's normalization.
32×32 starts at 4×4 (3 stages); 224×224 at 7×7 (5 stages). Any other H×W (a user's own model) is
generated at the smallest 4·2^k or 7·2^k square that covers it and center-cropped to H×W.
Every BatchNorm2d has the default eps=1e-5 (the GDFQ family's `BatchNorm2d(C, 0.8)` sets eps=0.8).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from core.errors import DFQFError, first_line
from core.files import atomic_torch_save, load_torch_file

FORMAT, VERSION = "dfqf.generator", 1


def _init_size(height: int, width: int) -> tuple[int, int]:
    """(start resolution, generated square side): the smallest init·2^k >= max(H, W), init 4 or 7, k >= 1
    (32 → 4·2^3, 224 → 7·2^5; 20 → 4·2^3 = 32, cropped)."""
    if min(height, width) < 1:
        raise ValueError(f"generator images must be at least 1x1, got {height}x{width}")
    side = max(height, width, 8)
    return min(((init, init << max(1, (-(-side // init) - 1).bit_length())) for init in (4, 7)),
               key=lambda t: (t[1], t[0]))


class Generator(nn.Module):
    def __init__(self, num_classes: int, image_size: tuple[int, int, int], mean: Sequence[float],
                 std: Sequence[float], latent_dim: int = 256, base_channels: int = 128,
                 conditional: bool = True) -> None:
        super().__init__()
        channels, height, width = image_size
        self.num_classes, self.latent_dim, self.conditional = num_classes, latent_dim, conditional
        self.image_size = (channels, height, width)
        self.init, side = _init_size(height, width)
        self.crop = ((side - height) // 2, (side - width) // 2)
        self.embed = nn.Embedding(num_classes, latent_dim) if conditional else None
        self.project = nn.Linear(latent_dim, base_channels * self.init**2)
        self.base_channels = base_channels
        layers: list[nn.Module] = [nn.BatchNorm2d(base_channels)]
        c, floor = base_channels, max(base_channels // 4, 32)
        for _ in range((side // self.init).bit_length() - 1):  # log2(side / init) stages
            nxt = max(c // 2, floor)
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(c, nxt, 3, 1, 1, bias=False), nn.BatchNorm2d(nxt),
                       nn.LeakyReLU(0.2)]
            c = nxt
        layers.append(nn.Conv2d(c, channels, 3, 1, 1))
        self.body = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def pixels(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [0, 1], [N, C, H, W]."""
        if self.conditional:
            if labels is None:
                raise ValueError("a conditional generator needs labels")
            z = z * self.embed(labels)
        h = self.body(self.project(z).view(z.shape[0], self.base_channels, self.init, self.init))
        (top, left), (_, height, width) = self.crop, self.image_size
        h = h[:, :, top:top + height, left:left + width]
        # sigmoid in (at least) fp32: under bf16 autocast its output would be coarser than 1/255 near 1
        return torch.sigmoid(h.to(torch.promote_types(h.dtype, torch.float32)))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels → the teacher's input space, (pixels − mean) / std."""
        return (pixels - self.mean) / self.std

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`."""
        return x * self.std + self.mean

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized images [N, C, H, W]; `labels` [N] are required iff the generator is conditional."""
        return self.normalize(self.pixels(z, labels))

    def sample_inputs(self, n: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z ~ N(0, I) [n, latent_dim] and labels [n], balanced over the classes (arange % classes, shuffled).

        Drawn on `generator`'s device (CPU without one), so a seed gives the same inputs on every machine,
        then moved to `device` (default: left where they were drawn)."""
        where = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn(n, self.latent_dim, generator=generator, device=where)
        order = torch.randperm(n, generator=generator, device=where)
        labels = (torch.arange(n, device=where) % self.num_classes)[order]
        device = where if device is None else device
        return z.to(device), labels.to(device)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] images in [0, 1] → uint8 [N, H, W, C] on the CPU, round half up (the on-disk synthetic
    format): e.g. 0.5 → floor(127.5 + 0.5) = 128. `core.pixels.normalize` of the result is what the student sees."""
    u8 = torch.floor(pixels.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    return u8.permute(0, 2, 3, 1).contiguous().cpu()


def save_generator(path: Path, g: Generator) -> None:
    """`generator.pt`: a plain dict (format, version, constructor arguments, state_dict), loadable with
    `torch.load(weights_only=True)`; `load_generator` rebuilds the generator from it."""
    atomic_torch_save({"format": FORMAT, "version": VERSION, "state_dict": g.state_dict(),
                       "num_classes": g.num_classes, "image_size": list(g.image_size),
                       "mean": g.mean.flatten().tolist(), "std": g.std.flatten().tolist(), "latent_dim": g.latent_dim,
                       "base_channels": g.base_channels, "conditional": g.conditional}, path)


def load_generator(path: Path) -> Generator:
    """The generator saved by `save_generator` (eval mode off: its BN layers use batch statistics when
    sampling, as during training); every problem is one DFQFError."""
    ck: Any = load_torch_file(path, "generator file")
    if not isinstance(ck, dict) or ck.get("format") != FORMAT or ck.get("version") != VERSION:
        raise DFQFError(f"{path} is not a DFQF generator file (format {FORMAT!r}, version {VERSION})")
    try:
        g = Generator(int(ck["num_classes"]), tuple(int(v) for v in ck["image_size"]), ck["mean"], ck["std"],
                      latent_dim=int(ck["latent_dim"]), base_channels=int(ck["base_channels"]),
                      conditional=bool(ck["conditional"]))
        g.load_state_dict(ck["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DFQFError(f"{path}: malformed generator file ({first_line(e)})") from None
    return g
