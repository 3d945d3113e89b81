"""How far is DFQF's synthetic data from real data? Stage 2 of train.dfqf on REAL training images.

    python -m benchmarks.dfqf_ceiling --data-dir D --out runs/ceiling/w4a4 [--images 6400] [train.dfqf flags]

NOT data-free, and never part of the product: a measuring stick for the accuracy table. The run is
`train.dfqf`'s two-stage schedule with stage 1 replaced: instead of training a generator and drawing
`--synth-images` images from it, it takes `--images` seeded random images of the data folder's *train*
split (their teacher logits computed the same way) and then fine-tunes the student exactly as DFQF does
(same calibration, KD loss, optimizer, schedule, EMA, checkpoints and `--resume`). The gap between its
top-1 and DFQF's is what better synthetic images could still win; its gap to FP is what the fine-tuning
recipe itself leaves at that budget.

Writes `--out`/report.json (method "real-data-kd", data_free false), student.pt (same contract, marked
not data-free), metrics.jsonl and config.json; no generator.pt or samples.png.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from train.artifacts import write_json_atomic
from train.data import load_split
from train.dfqf import DFQFRun, execute
from train.dfqf_config import resolve, with_overrides
from train.errors import CLIParser, DFQFError, cli_main
from train.generator import from_uint8
from train.quant.convert import QuantConfig
from train.student import save_student

METHOD = "real-data-kd"


class RealDataRun(DFQFRun):
    """DFQFRun whose 'synthetic' set is a seeded subset of real training images (no generator)."""

    def train_generator(self) -> None:
        self.step = self.cfg.g_steps  # nothing to train: stage 1 is the real subset below

    @torch.no_grad()
    def synthesize(self) -> dict[str, torch.Tensor]:
        x, y = load_split(self.data_dir, self.info.dataset, "train")
        if self.cfg.synth_images > len(x):
            raise DFQFError(f"--images {self.cfg.synth_images} is more than the {len(x)} training images")
        # shuffled, not just a subset: the split is sorted by class and calibration reads the first rows
        idx = np.random.default_rng(self.cfg.seed).permutation(len(x))[:self.cfg.synth_images]
        images = torch.from_numpy(x[idx])
        logits = [self.teacher(from_uint8(b, self.info.mean, self.info.std).to(self.d.device)).float().cpu()
                  for b in images.split(self.cfg.g_batch)]
        return {"images": images, "labels": torch.from_numpy(y[idx]), "teacher_logits": torch.cat(logits)}

    def finish(self) -> dict[str, Any]:
        c = self.cfg
        self.metrics.sync()
        save_student(self.out / "student.pt", self.final_student.cpu(), c.arch, self.info.num_classes,
                     QuantConfig(c.wbits, c.abits, c.first_last_bits), METHOD, False,
                     {"teacher": str(self.weights) if self.weights else None, "seed": c.seed,
                      "real_train_images": c.synth_images})
        self.final_student.to(self.d.device)
        report: dict[str, Any] = {
            "method": METHOD, "data_free": False, "arch": c.arch, "wbits": c.wbits, "abits": c.abits,
            "first_last_bits": c.first_last_bits, "real_train_images": c.synth_images,
            "student_steps": self.s_total, "wall_seconds": round(self.elapsed(), 1),
            "threads": torch.get_num_threads(), "seed": c.seed,
            "teacher": str(self.weights) if self.weights else None, **self.accuracy(),
        }
        write_json_atomic(report, self.out / "report.json")
        return report


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = CLIParser(prog="python -m benchmarks.dfqf_ceiling", add_help=False)
    p.add_argument("--images", type=int, default=6400)
    p.add_argument("-h", "--help", action="store_true")
    own, rest = p.parse_known_args(argv)
    if own.help:
        print(__doc__)
        return 0
    cfg = resolve(rest)
    if cfg.data_dir is None and not os.environ.get("DFQF_DATA_DIR"):
        raise DFQFError("no data folder: pass --data-dir (or set DFQF_DATA_DIR); the real images come from it")
    if cfg.schedule != "two-stage":
        raise DFQFError("the real-data ceiling uses the two-stage schedule only")
    if own.images <= 0:
        raise DFQFError(f"--images must be positive, got {own.images}")
    return execute(RealDataRun, with_overrides(cfg, synth_images=own.images))


if __name__ == "__main__":
    raise SystemExit(main())
