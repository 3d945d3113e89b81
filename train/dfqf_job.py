"""The state of one DFQF run (`train.dfqf`): its inputs, models, optimizers and position, checkpointed and
restored as a whole.

`Job(cfg, d, source)` checks every input before it creates the output folder, builds the teacher, the
generator and the initial student (BN folded, LSQ quantizers, weight ranges by MSE and activation ranges from
BN statistics until the synthetic set exists), and on `--resume` restores the last checkpoint. The stages
(`train.dfqf`) move it forward: `stage` is "generator" (stage 1, or before the synthetic set of a source that
trains none), "student" (fine-tuning), "alternating" or "done"; `step` counts within the stage.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from core.errors import DFQFError, first_line
from core.files import write_json_atomic
from core.paths import optional_data_dir

from .baselines.dfq import bn_output_stats, input_gaussian, set_ranges_from_stats
from .baselines.gaussian_stats import propagate
from .data import evaluation_data, image_batches, subset
from .dfqf_config import LR_FIELDS, DFQFConfig
from .distributed import Dist
from .ema import StudentEMA, ema_decay
from .evaluate import evaluate_top1
from .feature_kd import FeatureDistiller
from .generator import Generator
from .models import get_arch, load_teacher, resolve_weights
from .models.registry import ArchInfo, teacher_arch
from .quant.calibrate import calibrate_weights
from .quant.convert import quantize_model
from .quant.modules import ActQuantizer, WeightQuantizer
from .run_state import METRICS, MetricsLog, load_checkpoint, save_checkpoint
from .seeds import Seeds, rng_state, set_rng_state
from .synthetic import SyntheticSource


def prepare_out(cfg: DFQFConfig, d: Dist) -> Path:
    """Create --out (or check it for --resume); refuse to overwrite a finished or different run."""
    out = Path(cfg.out)
    saved = out / "config.json"
    if cfg.resume:
        if not saved.exists():
            raise DFQFError(f"--resume: {out} holds no run (no config.json)")
        try:
            old = json.loads(saved.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise DFQFError(f"--resume: {saved} is not a run's config ({first_line(e)})") from None
        diff = cfg.resume_differences(old)
        if diff:
            raise DFQFError(f"--resume: {out} was run with another config (differs in {', '.join(diff)})")
    elif saved.exists():
        raise DFQFError(f"{out} already holds a run: pass --resume to continue it or choose another --out")
    d.barrier()  # every rank has checked the folder before rank 0 writes into it
    if d.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            if not cfg.resume:
                write_json_atomic(cfg.to_dict(), saved)
            elif any(json.loads(saved.read_text()).get(k) != v for k, v in cfg.to_dict().items() if k in LR_FIELDS):
                # the learning rates of a resumed run: kept next to the original config, never over it
                write_json_atomic(cfg.to_dict(), out / "config.resumed.json")
        except OSError as e:
            raise DFQFError(f"cannot write to --out {out}: {e.strerror or e}") from None
    d.barrier()
    return out


def initial_student(teacher: nn.Module, cfg: DFQFConfig, info: ArchInfo) -> fx.GraphModule:
    """Teacher -> BN folded -> quantizers; weight ranges by MSE, activation ranges from BN statistics
    (data-free, DFQ-style) until the synthetic set exists to calibrate on."""
    student = quantize_model(teacher, cfg.quant_config())
    calibrate_weights(student, cfg.init_observer)
    prop = propagate(student, bn_output_stats(teacher), input_gaussian(info.mean, info.std))
    m, s = torch.tensor(info.mean), torch.tensor(info.std)
    set_ranges_from_stats(student, prop.at_quantizer, (((0 - m) / s).min(), ((1 - m) / s).max()))
    return student


def student_optimizer(student: nn.Module, cfg: DFQFConfig) -> torch.optim.Optimizer:
    """Adam with two groups: weights and biases at s_lr, the LSQ step sizes at s_scale_lr."""
    scales = [p for m in student.modules() if isinstance(m, (ActQuantizer, WeightQuantizer)) for p in m.parameters()]
    ids = {id(p) for p in scales}
    weights = [p for p in student.parameters() if id(p) not in ids]
    return torch.optim.Adam([{"params": weights, "lr": cfg.s_lr}, {"params": scales, "lr": cfg.s_scale_lr}])


class Job:
    def __init__(self, cfg: DFQFConfig, d: Dist, source: SyntheticSource) -> None:
        self.cfg, self.d, self.source = cfg, d, source
        self.seeds = Seeds(cfg.seed, d.rank)
        # check every input before the output folder is created
        self.arch = teacher_arch(cfg.arch, cfg.weights, cfg.model, cfg.mean, cfg.std)  # --model registers one
        self.info = get_arch(self.arch)
        self.weights = resolve_weights(self.arch, cfg.weights)
        self.teacher_file = Path(cfg.model) if cfg.model else self.weights  # what the student's meta records
        self.data_dir = optional_data_dir(cfg.data_dir)
        # read once, now: a bad data folder fails before stage 1, not after it
        self.eval_split = evaluation_data(self.info.dataset, self.info.input_size, self.info.num_classes,
                                          self.data_dir, cfg.split, cfg.eval_data) if d.main else None
        torch.manual_seed(cfg.seed)
        self.teacher = load_teacher(self.arch, self.weights).to(d.device)  # bad weights fail before --out exists
        source.check(self)
        self.out = prepare_out(cfg, d)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.generator = Generator(self.info.num_classes, self.info.input_size, self.info.mean, self.info.std,
                                   latent_dim=cfg.latent_dim, base_channels=cfg.g_width,
                                   conditional=cfg.conditional).to(d.device)
        self.student = initial_student(self.teacher, cfg, self.info).to(d.device)
        self.g_opt = torch.optim.Adam(self.generator.parameters(), lr=cfg.g_lr, betas=(0.5, 0.999))
        self.s_opt = student_optimizer(self.student, cfg)
        self.s_total = self.student_steps()
        decay = ema_decay(cfg.s_ema, self.s_total)
        self.ema = StudentEMA(self.student, decay) if decay > 0 else None  # starts as the initial student
        # after the EMA copy, so that only the trained student records features
        self.features = FeatureDistiller(self.teacher, self.student) if cfg.w_feat > 0 else None
        self.s_sched = torch.optim.lr_scheduler.LambdaLR(
            self.s_opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, self.s_total) / max(self.s_total, 1))))
        self.g_ddp = DDP(self.generator) if d.world > 1 else self.generator
        self.s_ddp = DDP(self.student) if d.world > 1 else self.student
        self.stage, self.step = "generator" if cfg.schedule == "two-stage" else "alternating", 0
        self.images_generated = 0
        self.wall_before = 0.0  # seconds spent before the last resume
        keep = self.restore() if cfg.resume else 0  # metrics lines that belong to the restored state
        self.metrics = MetricsLog(self.out / METRICS, keep) if d.main else None
        self.started = time.perf_counter()

    def student_steps(self) -> int:
        c = self.cfg
        if c.schedule == "alternating":
            return c.alt_steps * c.alt_s_per_g
        return c.s_epochs * math.ceil(c.synth_images / self.d.world / c.s_batch)

    # -- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"stage": self.stage, "step": self.step, "images_generated": self.images_generated,
                "wall_seconds": self.elapsed(), "metrics_lines": self.metrics.lines if self.metrics else 0,
                "generator": self.generator.state_dict(), "student": self.student.state_dict(),
                "g_opt": self.g_opt.state_dict(), "s_opt": self.s_opt.state_dict(),
                "s_sched": self.s_sched.state_dict(), "rng": rng_state(), "config": self.cfg.to_dict(),
                "student_ema": self.ema.model.state_dict() if self.ema else None}

    def checkpoint(self) -> None:
        if self.d.main:
            self.metrics.sync()
            save_checkpoint(self.out, self.state())

    def enter(self, stage: str) -> None:
        """Start `stage` at step 0 and checkpoint: a run resumed from here begins the stage."""
        self.stage, self.step = stage, 0
        self.checkpoint()

    def restore(self) -> int:
        ck = load_checkpoint(self.out)
        if ck is None:
            return 0  # killed before the first checkpoint: start over
        try:
            self.generator.load_state_dict(ck["generator"])
            self.student.load_state_dict(ck["student"])
            self.g_opt.load_state_dict(ck["g_opt"])
            self.s_opt.load_state_dict(ck["s_opt"])
            self.s_sched.load_state_dict(ck["s_sched"])
            if self.ema is not None:
                self.ema.model.load_state_dict(ck["student_ema"])
            set_rng_state(ck["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise DFQFError(f"{self.out}/checkpoint.pt does not fit this run ({first_line(e)})") from None
        for group, lr in zip(self.s_opt.param_groups, (self.cfg.s_lr, self.cfg.s_scale_lr)):
            group["initial_lr"] = lr  # a resume may lower the learning rates
        for group in self.g_opt.param_groups:
            group["lr"] = self.cfg.g_lr
        self.stage, self.step = ck["stage"], ck["step"]
        self.images_generated, self.wall_before = ck["images_generated"], ck["wall_seconds"]
        self.log(f"resumed at stage {self.stage}, step {self.step}")
        return ck["metrics_lines"]

    def elapsed(self) -> float:
        return self.wall_before + time.perf_counter() - getattr(self, "started", time.perf_counter())

    # -- what the stages share --------------------------------------------------------------------
    @property
    def final_student(self) -> nn.Module:
        """The student that is evaluated, reported and saved: the EMA when one is kept."""
        return self.ema.model if self.ema is not None else self.student

    def log(self, msg: str) -> None:
        if self.d.main:
            print(f"[dfqf] {msg}", file=sys.stderr, flush=True)

    def record(self, stage: str, terms: dict[str, float], step: int | None = None) -> None:
        if self.metrics is not None:
            self.metrics.write({"stage": stage, "step": self.step if step is None else step,
                                "time": round(self.elapsed(), 2), **terms})

    def check_finite(self, loss: torch.Tensor, terms: dict[str, float]) -> None:
        if not torch.isfinite(loss):
            self.checkpoint()  # the state before this step is still good
            raise DFQFError(f"non-finite {self.stage} loss at step {self.step} ({terms}); the last good state is "
                            f"checkpointed in {self.out}: rerun with --resume and a lower --g-lr/--s-lr")

    def progress(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, initial=self.step, desc=desc, file=sys.stderr, dynamic_ncols=True,
                    disable=not (self.d.main and self.cfg.progress))

    @property
    def evaluates(self) -> bool:
        """Whether this rank evaluates: rank 0, with --eval-data or a data folder holding the teacher's CIFAR
        data set (tinynet's synthetic data set and ImageNet teachers are not evaluated during a run)."""
        return self.eval_split is not None

    def evaluate(self, model: nn.Module, limit: int | None) -> float:
        assert self.eval_split is not None
        x, y = self.eval_split
        if limit is not None:
            x, y = subset(x, y, limit, self.cfg.seed)
        top1, _ = evaluate_top1(model, image_batches(x, y, self.info.mean, self.info.std, 500), self.d.device)
        return top1
