"""DFQF: data-free quantization-aware fine-tuning (ACML 2020), end to end, resumable, multi-process.

    python -m train.dfqf [--arch resnet20] [--weights W] [--wbits 4 --abits 4] [--data-dir D] [--out DIR]
    torchrun --nproc_per_node N -m train.dfqf ...          (DistributedDataParallel; rank 0 writes)

Stage 1 trains a generator G against the frozen FP teacher T (inception-score, BN-statistics and
adversarial losses against the student S). Then a synthetic set is drawn from G (kept as uint8, with the
teacher's logits) and S — the teacher with BN folded and LSQ quantizers inserted — is fine-tuned on it by
knowledge distillation. `--schedule alternating` instead interleaves G and S updates (DFAD/GDFQ style).
With `s_ema` > 0 an exponential moving average of the student's float state is kept during fine-tuning;
it is what is evaluated, reported and saved.
No real training image is ever used: the data folder is read only to evaluate.

Outputs in --out: config.json, generator.pt, student.pt, metrics.jsonl, report.json, samples.png,
synthetic.pt, checkpoint.pt (resume with --resume after any interruption, SIGKILL included).
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .artifacts import atomic_torch_save, write_json_atomic
from .baselines.dfq import bn_output_stats, input_gaussian, set_ranges_from_stats
from .baselines.gaussian_stats import propagate
from .data import image_batches, load_split, resolve_data_dir, subset
from .dfqf_config import DFQFConfig, resolve
from .errors import DFQFError, cli_main
from .evaluate import evaluate_top1
from .feature_kd import FeatureDistiller
from .generator import Generator, from_uint8, to_uint8
from .losses import BNStatsHook, generator_loss, kd_loss
from .models import get_arch, load_teacher, resolve_weights
from .models.registry import ArchInfo, sha256_file
from .quant.calibrate import calibrate_activations, calibrate_weights
from .quant.convert import QuantConfig, quantize_model
from .quant.modules import ActQuantizer, WeightQuantizer
from .run_state import METRICS, MetricsLog, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .samples import CIFAR10_CLASSES, save_sample_grid
from .student import save_student

LR_FIELDS = {"g_lr", "s_lr", "s_scale_lr"}  # may change on --resume (e.g. after a non-finite loss)


# -- set-up -------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(requested: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if requested == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        try:
            device_type = torch.device(requested).type
        except RuntimeError:
            raise DFQFError(f"unknown --device {requested!r} (auto, cpu, cuda, cuda:N)") from None
        if device_type == "cuda" and not torch.cuda.is_available():
            raise DFQFError("--device cuda: CUDA is not available on this machine")
    if world == 1:
        return Dist(0, 1, torch.device(device_type if requested == "auto" else requested))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    device = torch.device(f"cuda:{local}") if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Dist(rank, world, device)


def prepare_out(cfg: DFQFConfig, d: Dist) -> Path:
    """Create --out (or check it for --resume); refuse to overwrite a finished or different run."""
    out = Path(cfg.out)
    saved = out / "config.json"
    if cfg.resume:
        if not saved.exists():
            raise DFQFError(f"--resume: {out} holds no run (no config.json)")
        old = json.loads(saved.read_text())
        theirs = {k: v for k, v in old.items() if k in cfg.result_fields() and k not in LR_FIELDS}
        ours = {k: v for k, v in cfg.result_fields().items() if k not in LR_FIELDS}
        # a field added after the run was started is compared at its default (the behaviour of that older code)
        defaults = {f.name: f.default for f in fields(DFQFConfig)}
        diff = sorted(k for k in ours if theirs.get(k, defaults[k]) != ours[k])
        if diff:
            raise DFQFError(f"--resume: {out} was run with another config (differs in {', '.join(diff)})")
    elif saved.exists():
        raise DFQFError(f"{out} already holds a run: pass --resume to continue it or choose another --out")
    if d.world > 1:
        dist.barrier()  # every rank has checked the folder before rank 0 writes into it
    if d.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cfg.to_dict(), saved)
        except OSError as e:
            raise DFQFError(f"cannot write to --out {out}: {e.strerror or e}") from None
    if d.world > 1:
        dist.barrier()
    return out


def initial_student(teacher: nn.Module, cfg: DFQFConfig, info: ArchInfo) -> fx.GraphModule:
    """Teacher → BN folded → quantizers; weight ranges by MSE, activation ranges from BN statistics
    (data-free, DFQ-style) until the synthetic set exists to calibrate on."""
    student = quantize_model(teacher, QuantConfig(cfg.wbits, cfg.abits, cfg.first_last_bits))
    calibrate_weights(student, cfg.init_observer)
    prop = propagate(student, bn_output_stats(teacher), input_gaussian(info.mean, info.std))
    m, s = torch.tensor(info.mean), torch.tensor(info.std)
    set_ranges_from_stats(student, prop.at_quantizer, (((0 - m) / s).min(), ((1 - m) / s).max()))
    return student


def student_optimizer(student: nn.Module, cfg: DFQFConfig) -> torch.optim.Optimizer:
    scales = [p for m in student.modules() if isinstance(m, (ActQuantizer, WeightQuantizer)) for p in m.parameters()]
    ids = {id(p) for p in scales}
    weights = [p for p in student.parameters() if id(p) not in ids]
    return torch.optim.Adam([{"params": weights, "lr": cfg.s_lr}, {"params": scales, "lr": cfg.s_scale_lr}])


def flip_and_shift(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a batch: random horizontal flip, then a random crop of the
    reflection-padded image (a shift of up to `pad` pixels), drawn per image from `g`."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def ema_decay(half_life_fraction: float, steps: int) -> float:
    """Per-step decay of an EMA whose half-life is `half_life_fraction` of `steps` (0 disables: 0.0).

    The same setting then averages over the same share of a run of any length, e.g. 0.05 of 400 steps
    is a half-life of 20 steps: decay = 0.5 ** (1 / 20) = 0.9659; of 4000 steps, 0.99827.
    """
    if half_life_fraction <= 0:
        return 0.0
    return 0.5 ** (1.0 / max(half_life_fraction * steps, 1e-9))


class StudentEMA:
    """Exponential moving average of a student's floating-point state: weights, biases, LSQ step sizes.

    After every optimizer step, ema <- decay * ema + (1 - decay) * student for each float tensor of the
    state dict; integer buffers (zero points) are copied. The average is a separate model (`self.model`)
    so it can be evaluated and saved as it is; without BN in the student it has no statistics to
    recompute. Averaging smooths the step-to-step noise of small-batch distillation on a frozen set.
    """

    def __init__(self, student: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(student).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def reset(self, student: nn.Module) -> None:
        self.model.load_state_dict(student.state_dict())

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        for avg, now in zip(self.model.state_dict().values(), student.state_dict().values()):
            if avg.is_floating_point():
                avg.lerp_(now, 1.0 - self.decay)
            else:
                avg.copy_(now)


# -- the run ------------------------------------------------------------------------------------------
class DFQFRun:
    def __init__(self, cfg: DFQFConfig, d: Dist) -> None:
        self.cfg, self.d = cfg, d
        # check every input before the output folder is created
        self.info = get_arch(cfg.arch)
        self.weights = resolve_weights(cfg.arch, cfg.weights)
        self.data_dir = resolve_data_dir(cfg.data_dir) if cfg.data_dir or os.environ.get("DFQF_DATA_DIR") else None
        self.out = prepare_out(cfg, d)
        torch.manual_seed(cfg.seed)
        self.teacher = load_teacher(cfg.arch, self.weights).to(d.device)
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
            self.s_opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, self.s_total) / self.s_total)))
        self.g_ddp = DDP(self.generator) if d.world > 1 else self.generator
        self.s_ddp = DDP(self.student) if d.world > 1 else self.student
        self.stage, self.step = "generator" if cfg.schedule == "two-stage" else "alternating", 0
        self.synthetic: dict[str, torch.Tensor] | None = None
        self.eval_split: tuple[Any, Any] | None = None
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

    def restore(self) -> int:
        ck = load_checkpoint(self.out)
        if ck is None:
            return 0  # killed before the first checkpoint: start over
        self.generator.load_state_dict(ck["generator"])
        self.student.load_state_dict(ck["student"])
        self.g_opt.load_state_dict(ck["g_opt"])
        self.s_opt.load_state_dict(ck["s_opt"])
        self.s_sched.load_state_dict(ck["s_sched"])
        if self.ema is not None:
            self.ema.model.load_state_dict(ck["student_ema"])
        for group, lr in zip(self.s_opt.param_groups, (self.cfg.s_lr, self.cfg.s_scale_lr)):
            group["initial_lr"] = lr  # a resume may lower the learning rates
        for group in self.g_opt.param_groups:
            group["lr"] = self.cfg.g_lr
        set_rng_state(ck["rng"])
        self.stage, self.step = ck["stage"], ck["step"]
        self.images_generated, self.wall_before = ck["images_generated"], ck["wall_seconds"]
        self.log(f"resumed at stage {self.stage}, step {self.step}")
        return ck["metrics_lines"]

    def elapsed(self) -> float:
        return self.wall_before + time.perf_counter() - getattr(self, "started", time.perf_counter())

    @property
    def final_student(self) -> nn.Module:
        """The student that is evaluated, reported and saved: the EMA when one is kept."""
        return self.ema.model if self.ema is not None else self.student

    def log(self, msg: str) -> None:
        if self.d.main:
            print(f"[dfqf] {msg}", file=sys.stderr, flush=True)

    def record(self, stage: str, terms: dict[str, float]) -> None:
        if self.metrics is not None:
            self.metrics.write({"stage": stage, "step": self.step, "time": round(self.elapsed(), 2), **terms})

    def check_finite(self, loss: torch.Tensor, terms: dict[str, float]) -> None:
        if not torch.isfinite(loss):
            self.checkpoint()  # the state before this step is still good
            raise DFQFError(f"non-finite {self.stage} loss at step {self.step} ({terms}); the last good state is "
                            f"checkpointed in {self.out}: rerun with --resume and a lower --g-lr/--s-lr")

    def progress(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, initial=self.step, desc=desc, file=sys.stderr, dynamic_ncols=True,
                    disable=not (self.d.main and self.cfg.progress))

    # -- stage 1 and alternating G updates ---------------------------------------------------------
    def sample_generator(self, seed_offset: int = 0) -> torch.Generator:
        """This step's CPU random stream on this rank (a resumed run draws the same numbers)."""
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step * 97 + self.d.rank + seed_offset)

    def sample(self, n: int, seed_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        z, labels = self.generator.sample_inputs(n, generator=self.sample_generator(seed_offset))
        return z.to(self.d.device), labels.to(self.d.device)

    def generator_step(self) -> dict[str, float]:
        self.generator.train()
        self.student.eval()
        z, labels = self.sample(self.cfg.g_batch)
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cfg.amp and self.d.device.type == "cuda")
        with BNStatsHook(self.teacher) as hook, amp:
            x = self.g_ddp(z, labels if self.cfg.conditional else None)
            if self.cfg.g_augment:  # the teacher judges a shifted/flipped view: G cannot rely on exact pixels
                x = flip_and_shift(x, self.sample_generator(seed_offset=2), pad=2)
            t_logits = self.teacher(x)
            s_logits = self.student_logits_for_generator(x) if self.cfg.w_adv > 0 else None
            loss, terms = generator_loss(self.cfg.loss_weights(), t_logits.float(),
                                         None if s_logits is None else s_logits.float(), hook, labels)
        self.check_finite(loss, terms)
        self.g_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.g_opt.step()
        return terms

    def student_logits_for_generator(self, x: torch.Tensor) -> torch.Tensor:
        """S's logits with gradients to the images only (S is not updated by the generator loss)."""
        params = list(self.student.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            return self.student(x)
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)

    def train_generator(self) -> None:
        bar = self.progress(self.cfg.g_steps, "stage 1: generator")
        while self.step < self.cfg.g_steps:
            terms = self.generator_step()
            self.images_generated += self.cfg.g_batch * self.d.world
            self.step += 1
            self.record("generator", terms)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()})
            if self.step % self.cfg.checkpoint_every == 0:
                self.checkpoint()
        bar.close()

    # -- synthetic set --------------------------------------------------------------------------------
    @torch.no_grad()
    def synthesize(self) -> dict[str, torch.Tensor]:
        """Draw the frozen synthetic set (same on every rank: seeded), kept as uint8 with teacher logits."""
        path = self.out / "synthetic.pt"
        if path.exists() and self.stage == "student":
            return torch.load(path, map_location="cpu", weights_only=True)
        self.generator.train()  # BN with batch statistics, as during training
        g = torch.Generator().manual_seed(self.cfg.seed + 12345)
        images, labels, logits = [], [], []
        for start in range(0, self.cfg.synth_images, self.cfg.g_batch):
            n = min(self.cfg.g_batch, self.cfg.synth_images - start)
            z, y = self.generator.sample_inputs(n, generator=g)
            u8 = to_uint8(self.generator.pixels(z.to(self.d.device), y.to(self.d.device)
                                                if self.cfg.conditional else None))
            x = from_uint8(u8, self.info.mean, self.info.std).to(self.d.device)
            images.append(u8.cpu())
            labels.append(y)
            logits.append(self.teacher(x).float().cpu())
        synthetic = {"images": torch.cat(images), "labels": torch.cat(labels), "teacher_logits": torch.cat(logits)}
        self.images_generated += self.cfg.synth_images
        if self.d.main:
            atomic_torch_save(synthetic, path)
        return synthetic

    def calibrate_on_synthetic(self, synthetic: dict[str, torch.Tensor]) -> None:
        """Activation ranges from the synthetic images (MSE observer), before fine-tuning starts."""
        x = from_uint8(synthetic["images"][:1024], self.info.mean, self.info.std).to(self.d.device)
        calibrate_activations(self.student, list(x.split(self.cfg.s_batch)), self.cfg.init_observer)

    # -- stage 2 --------------------------------------------------------------------------------------
    def batches(self, synthetic: dict[str, torch.Tensor], epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's shard of a seeded permutation of the synthetic set."""
        n = len(synthetic["images"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch))
        order = order[self.d.rank::self.d.world]
        for start in range(0, len(order), self.cfg.s_batch):
            idx = order[start:start + self.cfg.s_batch]
            x = from_uint8(synthetic["images"][idx], self.info.mean, self.info.std).to(self.d.device)
            if not self.cfg.s_augment:
                yield x, synthetic["teacher_logits"][idx].to(self.d.device)
                continue
            # a new view of each image every epoch; its teacher logits must then be computed live
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch * 1_000_003 + start)
            x = flip_and_shift(x, g).to(self.d.device)
            with torch.no_grad():
                t_logits = self.teacher(x).float()
            yield x, t_logits  # outside no_grad: the consumer trains on this batch

    def student_step(self, x: torch.Tensor, t_logits: torch.Tensor) -> dict[str, float]:
        self.student.train()
        loss = kd_loss(self.s_ddp(x), t_logits, self.cfg.temperature)
        terms = {"kd": loss.item(), "lr": self.s_sched.get_last_lr()[0]}
        if self.features is not None:
            feat = self.features.loss(self.features.teacher_forward(x)[1])
            loss = loss + self.cfg.w_feat * feat
            terms["feat"] = feat.item()
        self.check_finite(loss, terms)
        self.s_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.s_opt.step()
        self.s_sched.step()
        if self.ema is not None:
            self.ema.update(self.student)
        return terms

    def train_student(self, synthetic: dict[str, torch.Tensor]) -> None:
        per_epoch = math.ceil(math.ceil(len(synthetic["images"]) / self.d.world) / self.cfg.s_batch)
        bar = self.progress(self.s_total, "stage 2: student")
        while self.step < self.s_total:
            epoch, skip = divmod(self.step, per_epoch)
            for i, (x, t_logits) in enumerate(self.batches(synthetic, epoch)):
                if i < skip:
                    continue  # resumed mid-epoch: these batches were done before the interruption
                self.after_student_step(self.student_step(x, t_logits), bar)
                if self.step >= self.s_total:
                    break
        bar.close()

    def after_student_step(self, terms: dict[str, float], bar: tqdm) -> None:
        self.step += 1
        if self.step % self.cfg.eval_every == 0 and self.data_dir is not None and self.d.main:
            terms["eval_top1"] = round(self.evaluate(self.final_student, self.cfg.eval_limit), 2)
        self.record(self.stage, terms)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()})
        if self.step % self.cfg.checkpoint_every == 0:
            self.checkpoint()

    # -- alternating schedule -------------------------------------------------------------------------
    def train_alternating(self) -> None:
        bar = self.progress(self.cfg.alt_steps, "alternating G/S")
        while self.step < self.cfg.alt_steps:
            terms = {f"g_{k}": v for k, v in self.generator_step().items()}
            for _ in range(self.cfg.alt_s_per_g):
                with torch.no_grad():
                    self.generator.train()
                    z, labels = self.sample(self.cfg.s_batch, seed_offset=1)
                    x = self.generator(z, labels if self.cfg.conditional else None)
                    t_logits = self.teacher(x)
                self.images_generated += (self.cfg.g_batch + self.cfg.s_batch) * self.d.world
                terms.update(self.student_step(x, t_logits))
            self.after_student_step(terms, bar)
        bar.close()

    # -- evaluation and outputs -----------------------------------------------------------------------
    def evaluate(self, model: nn.Module, limit: int | None) -> float:
        if self.eval_split is None:  # read (and decompress) the split once per run
            self.eval_split = load_split(self.data_dir, self.info.dataset, self.cfg.split)
        x, y = self.eval_split
        if limit is not None:
            x, y = subset(x, y, limit, self.cfg.seed)
        top1, _ = evaluate_top1(model, image_batches(x, y, self.info.mean, self.info.std, 500), self.d.device)
        return top1

    def run(self) -> dict[str, Any] | None:
        c = self.cfg
        if self.stage == "done":  # resumed after training finished: only the outputs are missing
            return self.finish() if self.d.main else None
        if c.schedule == "two-stage":
            if self.stage == "generator":
                self.train_generator()
                self.synthetic = self.synthesize()
                self.calibrate_on_synthetic(self.synthetic)
                if self.ema is not None:
                    self.ema.reset(self.student)  # the average starts from the calibrated student
                if self.data_dir is not None and self.d.main:  # the starting point of fine-tuning
                    self.step = 1
                    self.record("calibrated", {"eval_top1": round(self.evaluate(self.student, self.cfg.eval_limit), 2)})
                self.stage, self.step = "student", 0
                self.checkpoint()
            self.synthetic = self.synthetic or self.synthesize()
            self.train_student(self.synthetic)
        else:
            self.train_alternating()
        self.stage = "done"
        self.checkpoint()
        return self.finish() if self.d.main else None

    def finish(self) -> dict[str, Any]:
        c = self.cfg
        self.metrics.sync()
        atomic_torch_save({"state_dict": self.generator.state_dict(), "num_classes": self.info.num_classes,
                           "image_size": list(self.info.input_size), "mean": list(self.info.mean),
                           "std": list(self.info.std), "latent_dim": c.latent_dim, "base_channels": c.g_width,
                           "conditional": c.conditional},
                          self.out / "generator.pt")
        meta = {"teacher": str(self.weights) if self.weights else None,
                "teacher_sha256": sha256_file(self.weights) if self.weights else None,
                "torch": str(torch.__version__), "seed": c.seed, "schedule": c.schedule}
        save_student(self.out / "student.pt", self.final_student.cpu(), c.arch, self.info.num_classes,
                     QuantConfig(c.wbits, c.abits, c.first_last_bits), "dfqf", True, meta)
        self.final_student.to(self.d.device)
        self.write_samples()
        report: dict[str, Any] = {
            "method": "dfqf", "data_free": True, "arch": c.arch, "wbits": c.wbits, "abits": c.abits,
            "first_last_bits": c.first_last_bits, "schedule": c.schedule, "wall_seconds": round(self.elapsed(), 1),
            "generator_steps": c.g_steps if c.schedule == "two-stage" else c.alt_steps, "student_steps": self.s_total,
            "images_generated": self.images_generated, "world_size": self.d.world, "device": str(self.d.device),
            "threads": torch.get_num_threads(), "student_ema_decay": self.ema.decay if self.ema else None, **meta,
        }
        if self.data_dir is not None and self.info.dataset in ("cifar10", "cifar100"):
            report.update(self.accuracy())
        write_json_atomic(report, self.out / "report.json")
        return report

    def accuracy(self) -> dict[str, Any]:
        """Top-1 on the whole evaluation split: teacher, saved student and (with an EMA) the last raw one."""
        result = {"split": self.cfg.split, "fp_top1": round(self.evaluate(self.teacher, None), 2),
                  "fakequant_top1": round(self.evaluate(self.final_student, None), 2)}
        if self.ema is not None:  # the last student itself, to show what the average changes
            result["fakequant_top1_without_ema"] = round(self.evaluate(self.student, None), 2)
        return result

    @torch.no_grad()
    def write_samples(self) -> None:
        self.generator.train()
        per_class = 8
        k = min(self.info.num_classes, 10)
        labels = torch.arange(k).repeat_interleave(per_class)
        z = torch.randn(len(labels), self.cfg.latent_dim, generator=torch.Generator().manual_seed(self.cfg.seed))
        pixels = self.generator.pixels(z.to(self.d.device), labels.to(self.d.device) if self.cfg.conditional else None)
        predicted = self.teacher(self.generator.normalize(pixels)).argmax(1).cpu()
        names = CIFAR10_CLASSES if self.info.dataset == "cifar10" else None
        save_sample_grid(self.out / "samples.png", pixels.cpu(), labels, predicted, names, per_class)


def execute(run_class: type[DFQFRun], cfg: DFQFConfig) -> int:
    """Run `run_class(cfg)` on this process's device and rank; rank 0 prints the report as one JSON line."""
    d = setup_distributed(cfg.device)
    try:
        report = run_class(cfg, d).run()
        if report is not None:
            print(json.dumps(report))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


@cli_main
def main(argv: list[str] | None = None) -> int:
    return execute(DFQFRun, resolve(argv))


if __name__ == "__main__":
    raise SystemExit(main())
