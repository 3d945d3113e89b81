"""Where fine-tuning images come from: a `SyntheticSource` draws the frozen set the student is distilled on.

The set is a dict of CPU tensors: images uint8 [N, H, W, C], labels int64 [N] and the teacher's logits
float32 [N, classes]. DFQF's source is its generator (`GeneratorImages`, stored as synthetic.pt so a
resumed run fine-tunes on the same set); `benchmarks.dfqf_ceiling` passes real training images instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from core.errors import DFQFError
from core.files import atomic_torch_save, load_torch_file
from core.pixels import normalize

from .generator import to_uint8

if TYPE_CHECKING:
    from .dfqf_job import Job

SYNTHETIC = "synthetic.pt"
Synthetic = dict[str, torch.Tensor]


class SyntheticSource(Protocol):
    method: str  # report.json's and student.pt's "method"
    data_free: bool
    trains_generator: bool  # stage 1 runs (and generator.pt, samples.png are written)

    def check(self, job: "Job") -> None:
        """Refuse inputs this source cannot use, before the run creates its output folder."""

    def draw(self, job: "Job") -> Synthetic:
        """Make the set (after stage 1)."""

    def load(self, job: "Job") -> Synthetic:
        """The set `draw` made, for a run resumed after it."""

    def report(self, job: "Job") -> dict[str, Any]:
        """Fields this source adds to report.json and to student.pt's meta."""


@torch.no_grad()
def teacher_logits(job: "Job", images: torch.Tensor) -> torch.Tensor:
    """The teacher's float32 logits of uint8 NHWC images, in batches of the generator's batch size."""
    return torch.cat([job.teacher(normalize(b, job.info.mean, job.info.std).to(job.d.device)).float().cpu()
                      for b in images.split(job.cfg.g_batch)])


class GeneratorImages:
    """`synth_images` images drawn once from the trained generator (BN with batch statistics, as in training),
    rounded to uint8, with the teacher's logits of exactly those pixels; rank 0 saves them as synthetic.pt."""

    method, data_free, trains_generator = "dfqf", True, True

    def check(self, job: "Job") -> None:
        pass  # the generator's inputs are the run's own

    @torch.no_grad()
    def draw(self, job: "Job") -> Synthetic:
        cfg, g = job.cfg, job.generator
        g.train()
        stream = job.seeds.synthetic_set()
        images, labels = [], []
        for start in range(0, cfg.synth_images, cfg.g_batch):
            z, y = g.sample_inputs(min(cfg.g_batch, cfg.synth_images - start), generator=stream)
            images.append(to_uint8(g.pixels(z.to(job.d.device), y.to(job.d.device) if cfg.conditional else None)))
            labels.append(y)
        images = torch.cat(images)
        synthetic = {"images": images, "labels": torch.cat(labels), "teacher_logits": teacher_logits(job, images)}
        job.images_generated += cfg.synth_images
        if job.d.main:
            atomic_torch_save(synthetic, job.out / SYNTHETIC)
        return synthetic

    def load(self, job: "Job") -> Synthetic:
        path = job.out / SYNTHETIC
        synthetic = load_torch_file(path, "synthetic set")
        check_synthetic(synthetic, job, path)
        return synthetic

    def report(self, job: "Job") -> dict[str, Any]:
        c = job.cfg
        return {"generator_steps": c.g_steps if c.schedule == "two-stage" else c.alt_steps}


def check_synthetic(synthetic: Any, job: "Job", where: Path | str) -> None:
    """A synthetic set of this run's shapes and dtypes, else a DFQFError."""
    c, h, w = job.info.input_size
    ok = (isinstance(synthetic, dict) and all(isinstance(synthetic.get(k), torch.Tensor)
                                              for k in ("images", "labels", "teacher_logits")))
    if ok:
        x, y, t = synthetic["images"], synthetic["labels"], synthetic["teacher_logits"]
        ok = (x.dtype == torch.uint8 and tuple(x.shape[1:]) == (h, w, c) and len(x) > 0
              and y.shape == (len(x),) and t.shape == (len(x), job.info.num_classes) and t.is_floating_point())
    if not ok:
        raise DFQFError(f"{where} is not a synthetic set of this run (uint8 [N, {h}, {w}, {c}] images, labels and "
                        f"[N, {job.info.num_classes}] teacher logits); delete it to draw it again")
