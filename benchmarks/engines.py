"""The engines `benchmarks.bench` times, built from the FP teacher and the artifacts (peers and ours).

  torch_fp32       the FP teacher, torch eager
  torch_int8       the teacher through PT2E: torchao X86InductorQuantizer + torch.compile (freezing)
  ort_fp32         the teacher exported with torch.onnx, ONNX Runtime CPU
  ort_int8         ort_fp32 through onnxruntime quantize_static (QDQ, per-channel s8 weights, u8 activations)
  tvm_fp32         the teacher through relax from_exported_program and TVM's default llvm pipeline
  tvm_int<b>       the artifact's compiled integer graph (`runtime.load`); b = its weight bits
  ort_dfqf_int<b>  the artifact's own QDQ ONNX export under ONNX Runtime (the exact variant)
  ort_dfqf_fast_int<b>  its fast variant: every conv and add on ORT's fused int8 kernels
Every engine takes uint8 NHWC pixels (the FP ones normalize inside the model, as the integer graph does).
`prepare` makes the teacher's files once, in the parent process; `engine_builders` builds the runners inside a
worker process (one thread count).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.errors import first_line

FP_ENGINES = ("torch_fp32", "torch_int8", "ort_fp32", "ort_int8", "tvm_fp32")
Runner = Callable[[np.ndarray], np.ndarray]


def log(msg: str) -> None:
    import sys

    print(f"[benchmarks.bench] {msg}", file=sys.stderr, flush=True)


# -- the FP model every FP engine runs --------------------------------------------------------------------
def pixel_model(teacher: Any, mean: list[float], std: list[float]) -> Any:
    """teacher(normalize(x)) for uint8 NHWC pixels x, as one torch module (exportable, compilable)."""
    import torch

    class PixelInput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = teacher
            s, m = torch.tensor(std).view(1, -1, 1, 1), torch.tensor(mean).view(1, -1, 1, 1)
            self.register_buffer("gain", 1.0 / (255.0 * s))
            self.register_buffer("offset", -m / s)

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2).float() * self.gain + self.offset)

    return PixelInput().eval()


def teacher_of(plan: dict[str, Any]) -> Any:
    from train.models import load_teacher
    from train.models.registry import EXPORTED
    from train.student import read_student

    if plan["arch"].startswith(EXPORTED):
        read_student(Path(plan["student"]))  # a user's exported model: registered from the student it carries
    teacher = Path(plan["teacher"]) if plan["teacher"] else None
    return pixel_model(load_teacher(plan["arch"], teacher, **plan["arch_kwargs"]), plan["mean"], plan["std"])


# -- preparation, once, in the parent process (files the workers load) -------------------------------------
def export_onnx_fp32(model: Any, shape: tuple[int, ...], path: Path) -> Path:
    import torch

    x = torch.zeros((2, *shape), dtype=torch.uint8)
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "N"}, "logits": {0: "N"}}, opset_version=17)
    return path


def quantize_onnx_int8(fp32: Path, calib: np.ndarray, path: Path) -> Path:
    """ORT's own static quantization: QDQ, per-channel symmetric s8 weights, u8 activations (fast path)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixels": calib[i:i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return path


def compile_tvm_fp32(model: Any, shape: tuple[int, ...], path: Path) -> Path:
    import torch
    import tvm
    from tvm.relax.frontend.torch import from_exported_program

    from lower.targets import make_target

    x = torch.zeros((2, *shape), dtype=torch.uint8)
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("n", min=1, max=1 << 16)}})
    tvm.compile(from_exported_program(ep), target=make_target("llvm")).export_library(str(path))
    return path


def calibration_images(data_dir: str | None, n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
    from core.paths import data_dir_from_env
    from train.data import load_split, subset

    root = Path(data_dir) if data_dir else data_dir_from_env()
    if root is not None and (root / "cifar10").is_dir() and tuple(shape) == (32, 32, 3):
        x, y = load_split(root, "cifar10", "test")
        return subset(x, y, n, 0)[0], f"{n} CIFAR-10 test images ({root})"
    return (np.random.default_rng(1).integers(0, 256, (n, *shape), dtype=np.uint8),
            f"{n} random uint8 images (no CIFAR-10 data found)")


def prepare(plan: dict[str, Any], workdir: Path, data_dir: str | None, calib_n: int) -> None:
    """Export/quantize/compile the teacher's files for the requested FP engines; failures -> unavailable."""
    wanted, bad = set(plan["engines"]), plan["unavailable"]
    shape = tuple(plan["input_shape"])
    calib, plan["calibration"] = calibration_images(data_dir, calib_n, shape)
    np.save(workdir / "calib.npy", calib)
    try:
        model = teacher_of(plan)
    except Exception as e:  # noqa: BLE001 - any failure makes the FP engines unavailable, not the run
        for k in wanted.intersection(FP_ENGINES):
            bad[k] = f"teacher: {first_line(e)}"
        return
    steps = [(("ort_fp32", "ort_int8"), "onnx_fp32", lambda p: export_onnx_fp32(model, shape, p), "teacher_fp32.onnx"),
             (("ort_int8",), "onnx_int8", lambda p: quantize_onnx_int8(workdir / "teacher_fp32.onnx", calib, p),
              "teacher_int8_qdq.onnx"),
             (("tvm_fp32",), "tvm_fp32", lambda p: compile_tvm_fp32(model, shape, p), "teacher_fp32_tvm.so")]
    for users, key, make, name in steps:
        users = [e for e in users if e in wanted and e not in bad]  # an engine whose input failed is skipped
        if not users:
            continue
        t0 = time.perf_counter()
        try:
            plan["files"][key] = str(make(workdir / name))
            log(f"prepared {name} ({time.perf_counter() - t0:.1f} s)")
        except Exception as e:  # noqa: BLE001
            for engine in users:
                bad[engine] = f"{name}: {first_line(e)}"
            log(f"{', '.join(users)} unavailable: {first_line(e)}")


# -- engines, built inside a worker (one thread count) ------------------------------------------------------
def _ort_runner(path: str, threads: int, spin: bool = False) -> Runner:
    from runtime.ort import inference_session

    session = inference_session(path, threads, spin)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _torch_fp32(plan: dict[str, Any], threads: int) -> Runner:
    import torch

    model = teacher_of(plan)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


def _torch_int8(plan: dict[str, Any], threads: int) -> Runner:
    """PT2E: export, X86InductorQuantizer (u8 activations, per-channel s8 weights), calibrate, convert,
    torch.compile with freezing; Inductor compiles (tens of seconds) at the first call of each batch size."""
    import torch
    import torch._inductor.config as inductor
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    model = teacher_of(plan)
    calib = np.load(plan["files"]["calib"])
    x = torch.from_numpy(calib[:2])
    with torch.no_grad():
        batch_dim = {"x": {0: torch.export.Dim("n", min=1, max=1 << 16)}}
        # strict (Dynamo) tracing: the default non-strict export of torchvision ResNets (their in-place residual
        # add) makes X86InductorQuantizer fail ("Input partition has more than one output node")
        exported = torch.export.export(model, (x,), dynamic_shapes=batch_dim, strict=True)
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported.module(), quantizer)
        for i in range(0, len(calib), 64):
            prepared(torch.from_numpy(calib[i:i + 64]))
        converted = convert_pt2e(prepared)
    inductor.freezing = True
    inductor.cpp.threads = threads
    compiled = torch.compile(converted, dynamic=False)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return compiled(torch.from_numpy(x)).numpy()

    return run


def _tvm_fp32(plan: dict[str, Any], threads: int) -> Runner:
    import tvm

    vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(plan["files"]["tvm_fp32"]), tvm.cpu())

    def run(x: np.ndarray) -> np.ndarray:
        out = vm["main"](tvm.runtime.tensor(x))
        return (out if hasattr(out, "numpy") else out[0]).numpy()

    return run


def _tvm_int(path: str) -> Callable[[dict[str, Any], int], Runner]:
    def build(plan: dict[str, Any], threads: int) -> Runner:
        from runtime import load

        model = load(path)
        executable, params = model.executable, model.params
        return lambda x: executable(x, params)

    return build


def engine_builders(plan: dict[str, Any]) -> dict[str, Callable[[dict[str, Any], int], Runner]]:
    files = plan["files"]
    table: dict[str, Callable[[dict[str, Any], int], Runner]] = {
        "torch_fp32": _torch_fp32,
        "torch_int8": _torch_int8,
        "ort_fp32": lambda p, t: _ort_runner(files["onnx_fp32"], t, p["spin"]),
        "ort_int8": lambda p, t: _ort_runner(files["onnx_int8"], t, p["spin"]),
        "tvm_fp32": _tvm_fp32,
    }
    for name, art in plan["artifacts"].items():
        table[f"tvm_{name}"] = _tvm_int(art["path"])
        for variant, path in art["onnx"].items():
            table[ort_engine_name(variant, name)] = (lambda path: lambda p, t: _ort_runner(path, t, p["spin"]))(path)
    return table


def ort_engine_name(variant: str, artifact: str) -> str:
    """ort_dfqf_int8 (the exact ONNX variant), ort_dfqf_fast_int8 (the fast one)."""
    return f"ort_dfqf_{artifact}" if variant == "exact" else f"ort_dfqf_{variant}_{artifact}"


