"""Every random stream of a DFQF run in one place, and the process RNG state a checkpoint carries.

A stream is a fresh `torch.Generator` seeded from the run's seed, the rank and the position in the run,
so a resumed run draws exactly the numbers the uninterrupted run drew (no stream's state needs saving).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# streams within one generator step
G_BATCH, S_BATCH, G_AUGMENT = 0, 1, 2


@dataclass(frozen=True)
class Seeds:
    seed: int
    rank: int = 0

    def _stream(self, value: int) -> torch.Generator:
        return torch.Generator().manual_seed(value)

    def generator_step(self, step: int, stream: int = G_BATCH) -> torch.Generator:
        """Step `step`'s inputs on this rank: G's batch, the alternating schedule's S batch, G's jitter."""
        return self._stream(self.seed * 1_000_003 + step * 97 + self.rank + stream)

    def synthetic_set(self) -> torch.Generator:
        """The frozen synthetic set (the same on every rank)."""
        return self._stream(self.seed + 12345)

    def epoch_order(self, epoch: int) -> torch.Generator:
        """The permutation of the synthetic set in fine-tuning epoch `epoch`."""
        return self._stream(self.seed * 7919 + epoch)

    def augmentation(self, epoch: int, start: int) -> torch.Generator:
        """The KD-time views of the batch starting at `start` of epoch `epoch`."""
        return self._stream(self.seed * 7919 + epoch * 1_000_003 + start)

    def samples(self) -> torch.Generator:
        """The latent codes of samples.png."""
        return self._stream(self.seed)

    def subset(self) -> np.random.Generator:
        """A NumPy stream for choosing images (the real-data reference)."""
        return np.random.default_rng(self.seed)


def rng_state() -> dict[str, Any]:
    """The process RNGs (torch, Python, NumPy, CUDA) as plain tensors and numbers (loads with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
