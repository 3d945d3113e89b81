"""DFQF: data-free quantization-aware fine-tuning (ACML 2020), end to end, resumable, multi-process.

    python -m train.dfqf [--arch resnet20] [--weights W] [--wbits 4 --abits 4] [--data-dir D] [--out DIR]
    python -m train.dfqf --model mine.pt2 [--mean M --std S] [--eval-data images.npz|FOLDER] ...
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

import json
import math
from typing import Any, Iterator

import torch
from torch import nn
from tqdm import tqdm

from core.cli import cli_main
from core.files import sha256_file, write_json_atomic
from core.pixels import normalize

from .augment import flip_and_shift
from .dfqf_config import DFQFConfig, resolve
from .dfqf_job import Job
from .distributed import Dist, setup_distributed, shutdown
from .generator import save_generator
from .losses import BNStatsHook, generator_loss, kd_loss
from .quant.calibrate import calibrate_activations
from .quant.modules import keep_steps_positive
from .reconstruct import ReconstructionConfig, reconstruct
from .samples import CIFAR10_CLASSES, save_sample_grid
from .seeds import G_AUGMENT, S_BATCH
from .student import save_student
from .synthetic import GeneratorImages, Synthetic, SyntheticSource


def run(cfg: DFQFConfig, d: Dist, source: SyntheticSource | None = None) -> dict[str, Any] | None:
    """One DFQF run (or its remainder after --resume); rank 0 returns the report."""
    job = Job(cfg, d, source or GeneratorImages())
    if job.stage == "done":
        pass  # resumed after training finished: only the outputs are missing
    elif cfg.schedule == "two-stage":
        train_generator(job)
        synthetic = synthetic_set(job)
        start_fine_tuning(job, synthetic)
        fine_tune(job, synthetic)
    else:
        train_alternating(job)
    if job.stage != "done":
        job.enter("done")
    return write_outputs(job) if d.main else None


# -- stage 1: the generator ---------------------------------------------------------------------------
def train_generator(job: Job) -> None:
    if job.stage != "generator" or not job.source.trains_generator:
        return
    bar = job.progress(job.cfg.g_steps, "stage 1: generator")
    while job.step < job.cfg.g_steps:
        terms = generator_step(job)
        job.images_generated += job.cfg.g_batch * job.d.world
        job.step += 1
        job.record("generator", terms)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()})
        if job.step % job.cfg.checkpoint_every == 0:
            job.checkpoint()
    bar.close()


def sample(job: Job, n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    z, labels = job.generator.sample_inputs(n, generator=job.seeds.generator_step(job.step, stream))
    return z.to(job.d.device), labels.to(job.d.device)


def generator_step(job: Job) -> dict[str, float]:
    cfg = job.cfg
    job.generator.train()
    job.student.eval()
    z, labels = sample(job, cfg.g_batch, 0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and job.d.device.type == "cuda")
    with BNStatsHook(job.teacher) as hook, amp:
        x = job.g_ddp(z, labels if cfg.conditional else None)
        if cfg.g_augment:  # the teacher judges a shifted/flipped view: G cannot rely on exact pixels
            x = flip_and_shift(x, job.seeds.generator_step(job.step, G_AUGMENT), pad=2)
        t_logits = job.teacher(x)
        s_logits = student_logits_for_generator(job, x) if cfg.w_adv > 0 else None
        loss, terms = generator_loss(cfg.loss_weights(), t_logits.float(),
                                     None if s_logits is None else s_logits.float(), hook, labels)
    job.check_finite(loss, terms)
    job.g_opt.zero_grad(set_to_none=True)
    loss.backward()
    job.g_opt.step()
    return terms


def student_logits_for_generator(job: Job, x: torch.Tensor) -> torch.Tensor:
    """S's logits with gradients to the images only (S is not updated by the generator loss)."""
    params = list(job.student.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        return job.student(x)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


# -- the synthetic set and the start of fine-tuning -----------------------------------------------------
def synthetic_set(job: Job) -> Synthetic:
    """Drawn once, right after stage 1; a run resumed later reads the same set back."""
    return job.source.draw(job) if job.stage == "generator" else job.source.load(job)


def start_fine_tuning(job: Job, synthetic: Synthetic) -> None:
    """Activation ranges from the synthetic images (MSE observer), then (with --recon-steps) block
    reconstruction on them; the EMA starts from this student."""
    if job.stage != "generator":
        return
    cfg, info = job.cfg, job.info
    x = normalize(synthetic["images"][:1024], info.mean, info.std).to(job.d.device)
    calibrate_activations(job.student, list(x.split(cfg.s_batch)), cfg.init_observer)
    if job.evaluates:  # the starting point
        job.record("calibrated", {"eval_top1": round(job.evaluate(job.student, cfg.eval_limit), 2)}, step=1)
    if cfg.recon_steps:  # the same on every rank: seeded, on the same images
        images = normalize(synthetic["images"][:cfg.recon_images], info.mean, info.std).to(job.d.device)
        blocks = reconstruct(job.student, job.teacher, images,
                             ReconstructionConfig(steps=cfg.recon_steps, seed=cfg.seed), log=job.log)
        terms = {"blocks": len(blocks), "logits_mse": round(blocks[-1]["mse_after"], 6)}
        if job.evaluates:
            terms["eval_top1"] = round(job.evaluate(job.student, cfg.eval_limit), 2)
        job.record("reconstructed", terms, step=1)
    if job.ema is not None:
        job.ema.reset(job.student)
    job.enter("student")


# -- stage 2: distillation on the frozen set ------------------------------------------------------------
def batches(job: Job, synthetic: Synthetic, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's shard of a seeded permutation of the synthetic set."""
    cfg, info = job.cfg, job.info
    n = len(synthetic["images"])
    order = torch.randperm(n, generator=job.seeds.epoch_order(epoch))[job.d.rank::job.d.world]
    for start in range(0, len(order), cfg.s_batch):
        idx = order[start:start + cfg.s_batch]
        x = normalize(synthetic["images"][idx], info.mean, info.std).to(job.d.device)
        if not cfg.s_augment:
            yield x, synthetic["teacher_logits"][idx].to(job.d.device)
            continue
        # a new view of each image every epoch; its teacher logits must then be computed live
        x = flip_and_shift(x, job.seeds.augmentation(epoch, start)).to(job.d.device)
        with torch.no_grad():
            t_logits = job.teacher(x).float()
        yield x, t_logits  # outside no_grad: the consumer trains on this batch


def student_step(job: Job, x: torch.Tensor, t_logits: torch.Tensor) -> dict[str, float]:
    job.student.train()
    if job.cfg.s_bn == "frozen":  # only the paper protocol's student has BN layers
        for m in job.student.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    loss = kd_loss(job.s_ddp(x), t_logits, job.cfg.temperature)
    terms = {"kd": loss.item(), "lr": job.s_sched.get_last_lr()[0]}
    if job.features is not None:
        feat = job.features.loss(job.features.teacher_forward(x)[1])
        loss = loss + job.cfg.w_feat * feat
        terms["feat"] = feat.item()
    job.check_finite(loss, terms)
    job.s_opt.zero_grad(set_to_none=True)
    loss.backward()
    job.s_opt.step()
    keep_steps_positive(job.student)
    job.s_sched.step()
    if job.ema is not None:
        job.ema.update(job.student)
    return terms


def fine_tune(job: Job, synthetic: Synthetic) -> None:
    if job.stage != "student":
        return
    per_epoch = math.ceil(math.ceil(len(synthetic["images"]) / job.d.world) / job.cfg.s_batch)
    bar = job.progress(job.s_total, "stage 2: student")
    while job.step < job.s_total:
        epoch, skip = divmod(job.step, per_epoch)
        for i, (x, t_logits) in enumerate(batches(job, synthetic, epoch)):
            if i < skip:
                continue  # resumed mid-epoch: these batches were done before the interruption
            after_student_step(job, student_step(job, x, t_logits), bar)
            if job.step >= job.s_total:
                break
    bar.close()


def after_student_step(job: Job, terms: dict[str, float], bar: tqdm) -> None:
    job.step += 1
    if job.step % job.cfg.eval_every == 0 and job.evaluates:
        terms["eval_top1"] = round(job.evaluate(job.final_student, job.cfg.eval_limit), 2)
    job.record(job.stage, terms)
    bar.update(1)
    bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()})
    if job.step % job.cfg.checkpoint_every == 0:
        job.checkpoint()


# -- the alternating schedule ---------------------------------------------------------------------------
def train_alternating(job: Job) -> None:
    if job.stage != "alternating":
        return
    cfg = job.cfg
    bar = job.progress(cfg.alt_steps, "alternating G/S")
    while job.step < cfg.alt_steps:
        terms = {f"g_{k}": v for k, v in generator_step(job).items()}
        for _ in range(cfg.alt_s_per_g):
            with torch.no_grad():
                job.generator.train()
                z, labels = sample(job, cfg.s_batch, S_BATCH)
                x = job.generator(z, labels if cfg.conditional else None)
                t_logits = job.teacher(x)
            job.images_generated += (cfg.g_batch + cfg.s_batch) * job.d.world
            terms.update(student_step(job, x, t_logits))
        after_student_step(job, terms, bar)
    bar.close()


# -- outputs --------------------------------------------------------------------------------------------
def write_outputs(job: Job) -> dict[str, Any]:
    """generator.pt and samples.png (when a generator was trained), student.pt and report.json."""
    c, source = job.cfg, job.source
    job.metrics.sync()
    extra = source.report(job)
    meta = {"teacher": str(job.teacher_file) if job.teacher_file else None,
            "teacher_sha256": sha256_file(job.teacher_file) if job.teacher_file else None,
            "torch": str(torch.__version__), "seed": c.seed, "schedule": c.schedule, **extra}
    if source.trains_generator:
        save_generator(job.out / "generator.pt", job.generator)
    save_student(job.out / "student.pt", job.final_student.cpu(), job.arch, job.info.num_classes,
                 c.quant_config(), source.method, source.data_free, meta)
    job.final_student.to(job.d.device)
    if source.trains_generator:
        write_samples(job)
    report: dict[str, Any] = {
        "method": source.method, "data_free": source.data_free, "arch": job.arch, "wbits": c.wbits, "abits": c.abits,
        "first_last_bits": c.first_last_bits, "residual_bits": c.residual_bits, "bits_override": c.bits_override,
        "protocol": c.protocol,
        "schedule": c.schedule, "wall_seconds": round(job.elapsed(), 1),
        "student_steps": job.s_total, "images_generated": job.images_generated, "world_size": job.d.world,
        "device": str(job.d.device), "threads": torch.get_num_threads(),
        "student_ema_decay": job.ema.decay if job.ema else None, **meta,
    }
    if job.evaluates:
        report.update(accuracy(job))
    write_json_atomic(report, job.out / "report.json")
    return report


def accuracy(job: Job) -> dict[str, Any]:
    """Top-1 on the whole evaluation split: teacher, saved student and (with an EMA) the last raw one."""
    result = {"split": job.cfg.split, "eval_images": len(job.eval_split[1]),
              "fp_top1": round(job.evaluate(job.teacher, None), 2),
              "fakequant_top1": round(job.evaluate(job.final_student, None), 2)}
    if job.ema is not None:  # the last student itself, to show what the average changes
        result["fakequant_top1_without_ema"] = round(job.evaluate(job.student, None), 2)
    return result


@torch.no_grad()
def write_samples(job: Job) -> None:
    job.generator.train()
    per_class = 8
    k = min(job.info.num_classes, 10)
    labels = torch.arange(k).repeat_interleave(per_class)
    z = torch.randn(len(labels), job.cfg.latent_dim, generator=job.seeds.samples())
    pixels = job.generator.pixels(z.to(job.d.device), labels.to(job.d.device) if job.cfg.conditional else None)
    predicted = job.teacher(job.generator.normalize(pixels)).argmax(1).cpu()
    names = CIFAR10_CLASSES if job.info.dataset == "cifar10" else None
    save_sample_grid(job.out / "samples.png", pixels.cpu(), labels, predicted, names, per_class)


def train_dfqf(cfg: DFQFConfig, source: SyntheticSource | None = None) -> dict[str, Any] | None:
    """`run` on this process's device and rank; the report on rank 0, None on the others."""
    d = setup_distributed(cfg.device)
    try:
        return run(cfg, d, source)
    finally:
        shutdown()


def execute(cfg: DFQFConfig, source: SyntheticSource | None = None) -> int:
    """`train_dfqf`; rank 0 prints the report as one JSON line."""
    report = train_dfqf(cfg, source)
    if report is not None:
        print(json.dumps(report))
    return 0


@cli_main
def main(argv: list[str] | None = None) -> int:
    return execute(resolve(argv))


if __name__ == "__main__":
    raise SystemExit(main())
