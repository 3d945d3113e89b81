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

from typing import TYPE_CHECKING, Any

import torch

from core.cli import CLIParser, cli_main
from core.errors import DFQFError
from train.data import load_split
from train.dfqf import execute
from train.dfqf_config import resolve, with_overrides
from train.synthetic import Synthetic, teacher_logits

if TYPE_CHECKING:
    from train.dfqf_job import Job

METHOD = "real-data-kd"


class RealImages:
    """A `train.synthetic.SyntheticSource` of `synth_images` seeded random rows of the data folder's train
    split, with the teacher's logits: no generator is trained, and nothing is data-free."""

    method, data_free, trains_generator = METHOD, False, False

    def check(self, job: "Job") -> None:
        if job.data_dir is None:
            raise DFQFError("no data folder: pass --data-dir (or set DFQF_DATA_DIR); the real images come from it")
        n = len(load_split(job.data_dir, job.info.dataset, "train")[1])
        if job.cfg.synth_images > n:
            raise DFQFError(f"--images {job.cfg.synth_images} is more than the {n} training images")

    @torch.no_grad()
    def draw(self, job: "Job") -> Synthetic:
        x, y = load_split(job.data_dir, job.info.dataset, "train")
        # shuffled, not just a subset: the split is sorted by class and calibration reads the first rows
        idx = job.seeds.subset().permutation(len(x))[:job.cfg.synth_images]
        images = torch.from_numpy(x[idx])
        return {"images": images, "labels": torch.from_numpy(y[idx]), "teacher_logits": teacher_logits(job, images)}

    load = draw  # the same rows again: nothing to cache

    def report(self, job: "Job") -> dict[str, Any]:
        return {"real_train_images": job.cfg.synth_images}


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
    if cfg.schedule != "two-stage":
        raise DFQFError("the real-data ceiling uses the two-stage schedule only")
    if own.images <= 0:
        raise DFQFError(f"--images must be positive, got {own.images}")
    return execute(with_overrides(cfg, synth_images=own.images), RealImages())


if __name__ == "__main__":
    raise SystemExit(main())
