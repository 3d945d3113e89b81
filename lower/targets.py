"""TVM targets and their Relax pipelines, as data (one table, no if-chains over target kinds).

`TARGETS[name]` says how to build the TVM target dict from user options, which runtime device runs it and
which Relax passes lower the integer graph for it, and which hand-written schedule sets
(`lower.schedules`) it may use, keyed by the CPU features they need. The passes only legalize, fuse and (on
CUDA) bind threads with dlight's default GPU rules; speed comes from the schedule set chosen for the target
(`select_schedules`), applied at compile time with no tuning. Ops a schedule set does not cover, and
targets without a matching set, use TVM's default loops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import tvm
from tvm import relax

from core.errors import DFQFError

from .schedules import X86_AMX, X86_AVX2, X86_VNNI, ScheduleSet

DEFAULT_CUDA_ARCH = "sm_80"
# The host side of a GPU build only launches kernels; keep it generic so it runs on any x86-64 host.
GENERIC_HOST = {"kind": "llvm"}


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. 'znver4'), or '' if LLVM cannot tell."""
    try:
        return str(tvm.target.codegen.llvm_get_system_cpu())
    except Exception:  # noqa: BLE001 - a missing LLVM answer only means a generic build
        return ""


# /proc/cpuinfo flag -> LLVM feature: the x86 ISA extensions a compiled module may use. A CPU *name* does not
# say which of them a machine has (a VM may call a Sapphire Rapids "rocketlake", without AMX, or hide AVX-512),
# so targets are built from the host's own flags and artifacts record what they need.
ISA_FEATURES = {
    "sse4_1": "sse4.1", "sse4_2": "sse4.2", "sse4a": "sse4a", "avx": "avx", "avx2": "avx2", "fma": "fma",
    "f16c": "f16c", "bmi1": "bmi", "bmi2": "bmi2", "avx_vnni": "avxvnni", "avx512f": "avx512f",
    "avx512bw": "avx512bw", "avx512cd": "avx512cd", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi", "avx512_vbmi2": "avx512vbmi2",
    "avx512_vnni": "avx512vnni", "avx512_bf16": "avx512bf16", "avx512_bitalg": "avx512bitalg",
    "avx512_vpopcntdq": "avx512vpopcntdq", "avx512_fp16": "avx512fp16", "amx_tile": "amx-tile",
    "amx_int8": "amx-int8", "amx_bf16": "amx-bf16",
}


def _cpu_features(mcpu: str, mattr: list[str] | None = None) -> frozenset[str]:
    """The ISA features (`ISA_FEATURES` values) LLVM enables for `mcpu` with `mattr`."""
    target = tvm.target.Target({"kind": "llvm", **({"mcpu": mcpu} if mcpu else {}), **({"mattr": mattr} if mattr else {})})
    return frozenset(f for f in tvm.target.codegen.llvm_get_cpu_features(target) if f in ISA_FEATURES.values())


def host_features(cpuinfo: str | None = None) -> frozenset[str]:
    """The ISA features this machine has, from the kernel's CPU flags (`cpuinfo`: the text of /proc/cpuinfo;
    read when not given); where there is none, LLVM's view of the host CPU's name."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return _cpu_features(host_cpu())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return _cpu_features(host_cpu())
    return frozenset(ISA_FEATURES[f] for f in flags if f in ISA_FEATURES)


def host_mattr(mcpu: str, have: frozenset[str] | None = None) -> list[str]:
    """The `mattr` that makes LLVM's `mcpu` match the features this host (or `have`) really has: + for what the
    name lacks (AMX on a VM that says rocketlake), - for what the name promises but the host hides."""
    have = host_features() if have is None else have
    named = _cpu_features(mcpu)
    return sorted(f"+{f}" for f in have - named) + sorted(f"-{f}" for f in named - have)


def required_features(target: tvm.target.Target) -> list[str]:
    """The ISA features a module built for `target` may use (what a host must have to run it)."""
    if target.kind.name != "llvm":
        return []
    return sorted(f for f in tvm.target.codegen.llvm_get_cpu_features(target) if f in ISA_FEATURES.values())


def gpu_arch(device_id: int = 0) -> str:
    """'sm_XY' of this machine's CUDA GPU (for builds that run here); DEFAULT_CUDA_ARCH without a GPU."""
    dev = tvm.cuda(device_id)
    return "sm_" + dev.compute_version.replace(".", "") if dev.exist else DEFAULT_CUDA_ARCH


def _llvm_target(mcpu: str | None = None, mattr: list[str] | None = None, **_: Any) -> tvm.target.Target:
    """This host (its CPU name and, as mattr, the features it really has), or the CPU `mcpu` / `mattr` name."""
    if mcpu is None:
        mcpu = host_cpu()
        mattr = host_mattr(mcpu) + list(mattr or [])
    return tvm.target.Target({"kind": "llvm", **({"mcpu": mcpu} if mcpu else {}), **({"mattr": mattr} if mattr else {})})


def _cuda_target(arch: str | None = None, host: dict | None = None, **_: Any) -> tvm.target.Target:
    return tvm.target.Target({"kind": "cuda", "arch": arch or DEFAULT_CUDA_ARCH}, host=host or GENERIC_HOST)


def _legalize() -> list[tvm.transform.Pass]:
    T = relax.transform
    # parameter-only work (weight packing, per-channel terms) moves to main_transform_params, run once at
    # upload (`IntegerExecutable.upload`)
    return [T.LiftTransformParams(), T.LegalizeOps(), T.AnnotateTIROpPattern(), T.FoldConstant(), T.FuseOps(), T.FuseTIR()]


def _gpu_schedules() -> list[tvm.transform.Pass]:
    """dlight's default rules: give every TIR kernel a thread binding (required by CUDA codegen)."""
    from tvm.s_tir import dlight as dl

    return [dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                    dl.gpu.GeneralReduction(), dl.gpu.Fallback())]


def _cpu_schedules() -> list[tvm.transform.Pass]:
    """Elementwise kernels as one inlined loop nest (`lower.schedules.cpu_inline`); conv kernels untouched."""
    from .schedules import cpu_inline

    return cpu_inline.passes()


def _vm_lowering(cuda_graph: bool = False) -> list[tvm.transform.Pass]:
    T = relax.transform
    return [T.RewriteDataflowReshape(), T.ToNonDataflow(), T.RemovePurityChecking(), T.CallTIRRewrite(),
            T.StaticPlanBlockMemory(), *([T.RewriteCUDAGraph()] if cuda_graph else []), T.LowerAllocTensor(),
            T.KillAfterLastUse(), T.LowerRuntimeBuiltin(), T.ComputePrimValue(), T.VMShapeLower(),
            T.AttachGlobalSymbol()]


@dataclass(frozen=True)
class TargetSpec:
    """make_target(**opts) -> tvm Target; device: tvm.runtime.device name; passes(): the Relax pipeline;
    schedules: the `lower.schedules.ScheduleSet`s it may use, best first (the first whose features the
    target has wins)."""

    make_target: Callable[..., tvm.target.Target]
    device: str
    passes: Callable[[], list[tvm.transform.Pass]]
    options: tuple[str, ...]
    schedules: tuple[ScheduleSet, ...] = field(default=())


TARGETS: dict[str, TargetSpec] = {
    "llvm": TargetSpec(_llvm_target, "cpu", lambda: _legalize() + _cpu_schedules() + _vm_lowering(), ("mcpu", "mattr"),
                       schedules=(X86_AMX, X86_VNNI, X86_AVX2)),  # else: default loops
    "cuda": TargetSpec(_cuda_target, "cuda", lambda: _legalize() + _gpu_schedules() + _vm_lowering(True),
                       ("arch", "host")),
}
NO_SCHEDULES = "none"


def target_features(target: tvm.target.Target) -> Callable[[tuple[str, ...]], bool]:
    """features -> whether `target` has all of them (LLVM's view of the target's mcpu/mattr)."""
    if target.kind.name != "llvm":
        return lambda features: not features
    return lambda features: bool(tvm.target.codegen.llvm_cpu_has_features(list(features), target))


def select_schedules(name: str, target: tvm.target.Target, choice: str = "auto",
                     has_features: Callable[[tuple[str, ...]], bool] | None = None) -> ScheduleSet | None:
    """The schedule set for target `name`, or None for default loops.

    choice: "auto" (the first of TARGETS[name].schedules whose features the target has), NO_SCHEDULES, or a
    set's name (an error if the target lacks its features).
    """
    spec = target_spec(name)
    has = has_features or target_features(target)
    if choice == NO_SCHEDULES:
        return None
    if choice == "auto":
        return next((s for s in spec.schedules if has(s.features)), None)
    chosen = next((s for s in spec.schedules if s.name == choice), None)
    if chosen is None:
        raise DFQFError(f"target {name!r} has no schedule set {choice!r}; known: "
                        f"{', '.join(['auto', NO_SCHEDULES] + [s.name for s in spec.schedules])}")
    if not has(chosen.features):
        raise DFQFError(f"schedule set {choice!r} needs {', '.join(chosen.features)}, which target {target} lacks")
    return chosen


def target_spec(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise DFQFError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    return TARGETS[name]


def make_target(name: str, **opts: Any) -> tvm.target.Target:
    """The TVM target for `name`; options not understood by that target are an error."""
    spec = target_spec(name)
    unknown = sorted(set(opts) - set(spec.options))
    if unknown:
        raise DFQFError(f"target {name!r} takes options {', '.join(spec.options)}, not {', '.join(unknown)}")
    return spec.make_target(**opts)


def relax_pipeline(name: str) -> tvm.transform.Pass:
    return tvm.transform.Sequential(target_spec(name).passes(), name=f"dfqf_{name}")


def target_dict(name: str, **opts: Any) -> dict[str, Any]:
    """The resolved TVM target of `name` as plain JSON data (for manifests), host target included."""

    def plain(v: Any) -> Any:
        if v is None or isinstance(v, (str, int, float, bool)):
            return v
        if hasattr(v, "items"):
            return {str(k): plain(x) for k, x in v.items()}
        if hasattr(v, "__iter__"):
            return [plain(x) for x in v]
        return str(v)

    return plain(make_target(name, **opts).export())
