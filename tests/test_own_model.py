"""Issue 17, bring your own model: CNNs defined here (not in the registry) go through the same commands as
ResNet20 — train.dfqf / train.ptq / train.evaluate --model FILE.pt2, lower.compile, runtime.parity,
benchmarks.bench — and through the Python API (`dfqf.quantize/compile/load`); unsupported ops, pickles inside a
.pt2 and inconsistent flags are one clear error; a student carries its model (no .pt2 needed to lower it);
evaluation data of the user's own (.npz or an ImageFolder tree, any input size)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfqf
from core.errors import DFQFError
from runtime.model import load
from toolkit import main_in_process, one_error_line
from train.data import read_eval_data
from train.models.exported import load_exported, supported_aten_ops
from train.models.registry import exported_arch

REPO = Path(__file__).resolve().parents[1]
SIZE = (3, 20, 20)  # not a registry input size, nor a power-of-two one (the generator crops a 28x28 square)


def plain_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(16, 5))
    return _random_bn(net)


class ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding="same"), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        _random_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).squeeze(-1).squeeze(-1))


def _random_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def save_pt2(model: nn.Module, path: Path, decompose: bool = False) -> Path:
    program = torch.export.export(model.eval(), (torch.zeros(1, *SIZE),))
    torch.export.save(program.run_decompositions() if decompose else program, str(path))
    return path


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def eval_npz(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "mine.npz"
    np.savez(path, x=rng.integers(0, 256, (48, SIZE[1], SIZE[2], 3), dtype=np.uint8), y=rng.integers(0, 5, 48))
    return path


# -- the exported graph, rebuilt -----------------------------------------------------------------------------
@pytest.mark.parametrize("decompose", [False, True], ids=["training-ir", "decomposed"])
@pytest.mark.parametrize("make", [plain_cnn, ResidualCNN], ids=["sequential", "residual"])
def test_exported_model_is_rebuilt_exactly(make, decompose, tmp_path) -> None:
    """Both IRs torch.export writes (conv2d/batch_norm/linear, or convolution/_native_batch_norm/addmm with a
    transposed weight folded) become the same modules, computing the same logits at any batch size."""
    model = make()
    rebuilt = load_exported(save_pt2(model, tmp_path / "m.pt2", decompose))
    x = torch.randn(5, *SIZE)  # exported at batch 1
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=1e-5)
    kinds = {type(m) for m in rebuilt.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.Linear} <= kinds  # what BN folding and the converter look for
    assert rebuilt.meta["input_shape"] == [1, *SIZE]


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def test_an_unsupported_op_is_one_error_listing_the_supported(tmp_path) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), Swish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    path = save_pt2(net, tmp_path / "swish.pt2")
    with pytest.raises(DFQFError, match="sigmoid") as e:
        load_exported(path)
    assert supported_aten_ops() in str(e.value) and "conv2d.default" in supported_aten_ops()
    err = one_error(run_cli("train.ptq", "--method", "minmax", "--model", str(path), "--out", str(tmp_path / "o")))
    assert "sigmoid" in err and "supported:" in err and not (tmp_path / "o" / "student.pt").exists()


class Payload:
    """Unpickling this creates `marker`: what a crafted .pt2 would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_inside_a_pt2_never_runs(tmp_path) -> None:
    """torch.export.load unpickles weights marked use_pickle with weights_only=False: refused, nothing runs."""
    good = save_pt2(plain_cnn(), tmp_path / "good.pt2")
    marker, bad = tmp_path / "pwned", tmp_path / "bad.pt2"
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        config_name = next(n for n in src.namelist() if n.endswith("weights_config.json"))
        config = json.loads(src.read(config_name))
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        for item in src.infolist():
            data = src.read(item)
            if item.filename == config_name:
                data = json.dumps(config).encode()
            elif item.filename.endswith("/weights/" + first["path_name"]):
                data = payload.getvalue()
            dst.writestr(item, data)
    with pytest.raises(DFQFError) as e:
        load_exported(bad)
    assert not marker.exists()
    assert "pickled Python object" in str(e.value)
    load_exported(good)  # torch.load is itself again


# -- the commands, on a model file ---------------------------------------------------------------------------
def test_own_model_through_dfqf_lower_parity_bench(tmp_path, eval_npz) -> None:
    """The ResNet20 commands, on a .pt2 of a residual CNN: the student carries the model (the .pt2 may be
    gone before lowering), the integer graph equals the reference bit for bit, bench times it next to peers."""
    pt2 = save_pt2(ResidualCNN(), tmp_path / "mine.pt2")
    run = tmp_path / "run"
    report = last_json(run_cli("train.dfqf", "--smoke", "--progress", "false", "--model", str(pt2),
                               "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--eval-data", str(eval_npz),
                               "--wbits", "8", "--abits", "8", "--out", str(run)))
    assert report["arch"] == exported_arch(pt2).name and report["teacher"] == str(pt2)
    assert report["fp_top1"] is not None and report["fakequant_top1"] is not None  # evaluated on the npz
    assert report["eval_images"] == 48
    ckpt = torch.load(run / "student.pt", weights_only=True)
    assert ckpt["input"] == {"size": list(SIZE), "mean": [0.5] * 3, "std": [0.25] * 3}
    pt2.rename(tmp_path / "moved.pt2")  # lowering needs only student.pt

    art = tmp_path / "art"
    assert run_cli("lower.compile", str(run / "student.pt"), "--out", str(art)).returncode == 0
    parity = last_json(run_cli("runtime.parity", str(art), "--eval-data", str(eval_npz), "--teacher",
                               str(tmp_path / "moved.pt2")))
    assert parity["tvm_equals_reference"] is True and parity["n"] == 48 and parity["top1_agreement"] >= 0.9
    assert max(parity["max_lsb_diff_per_layer"].values()) <= 1

    bench = last_json(run_cli("benchmarks.bench", str(art), "--batch", "1", "--repeat", "1", "--warmup", "1",
                              "--engines", "torch_fp32,ort_int8,tvm_int8", "--vnni-peak", "100",
                              "--calib-images", "16", "--teacher", str(tmp_path / "moved.pt2")))
    assert {r["engine"]: r["status"] for r in bench["results"]} == dict.fromkeys(
        ["torch_fp32", "ort_int8", "tvm_int8"], "ok")


def test_ptq_and_evaluate_take_a_model_file(tmp_path, eval_npz) -> None:
    pt2 = save_pt2(plain_cnn(), tmp_path / "seq.pt2")
    ev = last_json(run_cli("train.evaluate", "--model", str(pt2), "--eval-data", str(eval_npz)))
    assert ev["n"] == 48 and ev["num_classes"] == 5
    report = last_json(run_cli("train.ptq", "--method", "dfq", "--model", str(pt2), "--wbits", "8", "--abits", "8",
                               "--eval-data", str(eval_npz), "--out", str(tmp_path / "ptq")))
    assert report["eval_images"] == 48 and abs(report["fp_top1"] - ev["top1"]) < 1e-9
    assert report["teacher_sha256"] and report["arch"].startswith("pt2:")


@pytest.mark.parametrize("args, message", [
    (["--weights", "w.pt"], "exclude each other"),
    (["--mean", "0.5,0.5"], "--mean/--std need 3 values"),
    (["--std", "0,1,1"], "std > 0"),
])
def test_inconsistent_model_flags_are_one_error(args, message, tmp_path, capsys) -> None:
    pt2 = save_pt2(plain_cnn(), tmp_path / "seq.pt2")
    assert message in one_error_line(*main_in_process("train.ptq", ["--method", "minmax", "--model", pt2, *args,
                                                                    "--out", tmp_path / "o"], capsys))


def test_mean_without_a_model_and_a_missing_model_file(tmp_path, capsys) -> None:
    assert "describe a --model's input" in one_error_line(*main_in_process(
        "train.ptq", ["--method", "minmax", "--mean", "0,0,0", "--out", tmp_path / "o"], capsys))
    assert "cannot read the model file" in one_error(run_cli("train.evaluate", "--model", str(tmp_path / "no.pt2")))


def test_a_student_whose_model_was_altered_is_refused(tmp_path) -> None:
    student = dfqf.quantize(plain_cnn(), tmp_path / "q", input_size=SIZE, method="minmax", wbits=8, abits=8,
                            calib_size=8)
    ckpt = torch.load(student, weights_only=True)
    ckpt["model"]["program"] = torch.frombuffer(bytearray(save_pt2(ResidualCNN(), tmp_path / "o.pt2").read_bytes()),
                                                dtype=torch.uint8)
    torch.save(ckpt, tmp_path / "altered.pt")
    from train.student import read_student

    with pytest.raises(DFQFError, match="altered"):
        read_student(tmp_path / "altered.pt")


# -- the Python API ------------------------------------------------------------------------------------------
def test_api_quantize_compile_load_an_nn_module(tmp_path, eval_npz) -> None:
    """quantize(nn.Module) -> student.pt (and OUT/teacher.pt2), compile -> artifact, load -> predict: the
    compiled model's logits are the NumPy reference's, and its top-1 agrees with the fake-quant student's."""
    from lower.reference import run_graph
    from train.student import load_student

    out = tmp_path / "api"
    student = dfqf.quantize(ResidualCNN(), out, input_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3, smoke=True,
                            progress=False, wbits=8, abits=8)
    assert student == out / "student.pt" and (out / "teacher.pt2").is_file()
    artifact = dfqf.compile(student, out / "llvm", onnx=False)
    model = dfqf.load(artifact)
    x, _ = read_eval_data(eval_npz, SIZE, 5)
    logits = model.predict(x)
    np.testing.assert_array_equal(model.predict_int(x), run_graph(load(artifact).graph, x))
    fq, _ = load_student(student)
    from core.pixels import normalize

    with torch.no_grad():
        fake = fq(normalize(x, (0.5,) * 3, (0.25,) * 3).contiguous()).numpy()
    assert logits.dtype == np.float32 and (logits.argmax(1) == fake.argmax(1)).mean() >= 0.9


def test_api_errors_are_dfqf_errors(tmp_path) -> None:
    with pytest.raises(DFQFError, match="input_size"):
        dfqf.quantize(plain_cnn(), tmp_path / "a")
    with pytest.raises(DFQFError, match="unknown method"):
        dfqf.quantize(plain_cnn(), tmp_path / "b", input_size=SIZE, method="magic")
    with pytest.raises(DFQFError, match="unknown option"):
        dfqf.quantize(plain_cnn(), tmp_path / "c", input_size=SIZE, method="minmax", g_steps=3)
    with pytest.raises(DFQFError, match="torch.export cannot export"):
        dfqf.quantize(plain_cnn(), tmp_path / "d", input_size=(1, 20, 20), method="minmax")  # 1 channel, not 3


# -- evaluation data of the user's own -----------------------------------------------------------------------
def test_eval_data_from_an_image_folder(tmp_path) -> None:
    """Classes in sorted folder order; an image at the input size is taken as it is, a larger one resized
    (shorter side 256/224 of the input side) and center-cropped; grayscale files become RGB."""
    from PIL import Image

    rng = np.random.default_rng(3)
    exact = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    (tmp_path / "b_dog").mkdir()
    (tmp_path / "a_cat").mkdir()
    Image.fromarray(exact).save(tmp_path / "b_dog" / "1.png")
    Image.fromarray(np.full((60, 90, 3), 200, np.uint8)).save(tmp_path / "a_cat" / "2.png")
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(tmp_path / "a_cat" / "3.png")
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    x, y = read_eval_data(tmp_path, SIZE, num_classes=2)
    assert x.shape == (3, 20, 20, 3) and x.dtype == np.uint8 and y.tolist() == [0, 0, 1]
    np.testing.assert_array_equal(x[2], exact)
    assert (x[0] == 200).all() and (x[1] == 7).all()
    with pytest.raises(DFQFError, match="labels must lie in 0..0"):
        read_eval_data(tmp_path, SIZE, num_classes=1)


def test_eval_data_errors(tmp_path) -> None:
    np.savez(tmp_path / "small.npz", x=np.zeros((2, 8, 8, 3), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(DFQFError, match="8x8, the model takes 20x20"):
        read_eval_data(tmp_path / "small.npz", SIZE, 5)
    with pytest.raises(DFQFError, match="not found"):
        read_eval_data(tmp_path / "nothing", SIZE, 5)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DFQFError, match="holds no images"):
        read_eval_data(tmp_path / "empty", SIZE, 5)
    (tmp_path / "broken" / "cls").mkdir(parents=True)
    (tmp_path / "broken" / "cls" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DFQFError, match="cannot read image"):
        read_eval_data(tmp_path / "broken", SIZE, 5)


def test_the_readme_example_runs(tmp_path) -> None:
    text = (REPO / "README.md").read_text()
    start = text.index("```python\nimport numpy as np, torch, dfqf")
    code = text[start + len("```python\n"):text.index("```", start + 10)]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predicted = proc.stdout.strip().splitlines()[-1]
    assert predicted.startswith("[") and len(predicted.strip("[]").split()) == 8
    assert (tmp_path / "runs" / "api" / "llvm" / "manifest.json").is_file()
