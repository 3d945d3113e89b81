"""The compiled-artifact folder (DESIGN §5): claimed, written atomically, and verified against a closed
manifest on load.

    DIR/manifest.json   format, versions, target, bits per layer, sha256 and size of every other file
    DIR/graph.json      the integer graph's structure (lower.graph) and how its parameters are stored
    DIR/params.npz      integer parameters; weights of <= 4 bits packed two per byte (lower.int4)
    DIR/model.so        the TVM library (relax executable) for the target, when compiled
    DIR/model.onnx      the ONNX QDQ export, when exported: the exact variant (closest to the integer graph)
    DIR/model_fast.onnx the fast variant (every conv and add on ONNX Runtime's fused int8 kernels)
    DIR/tuning.json     the register tiles of the conv kernels (lower.tune), when tuned or given

Writing. `ArtifactWriter(out, overwrite)` claims `out` before the (long) build: an exclusive lock file next
to it (a second writer of the same folder fails at once), and `out` must not exist, or with `overwrite` be an
artifact folder (never a run folder or a file). `write` assembles the folder in a temporary sibling, then
renames it into place (replacing an old artifact by a swap, so it survives until the new one is complete).
Leftovers of a killed writer are removed by the next writer of that folder.

Reading. The manifest lists every file the loaders read, as a plain name (no folders, no `..`) with its
sha256 and size; a file that is missing, unlisted or different is refused. The hashes detect corruption
(a truncated copy, a flipped byte), not tampering: whoever can change model.so can change the manifest too,
and a module that is loaded runs its code. Load artifacts only from sources you trust as you would trust
any shared library.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.errors import DFQFError, first_line
from core.files import sha256_file as sha256

from .graph import IntGraph
from .int4 import pack_int4, unpack_int4
from .params import packed_param

FORMAT, VERSION = "dfqf.artifact", 1
MANIFEST, GRAPH, PARAMS, LIBRARY, ONNX = "manifest.json", "graph.json", "params.npz", "model.so", "model.onnx"
ONNX_FILES = {"exact": ONNX, "fast": "model_fast.onnx"}  # ONNX export variant (lower.onnx_export.VARIANTS) -> file
TUNING = "tuning.json"
SHA256 = re.compile(r"[0-9a-f]{64}")


def packed(graph: IntGraph) -> set[str]:
    """Parameter keys stored two per byte: the weights of layers with <= 4 bits."""
    return {f"{n.name}/weight" for n in graph.nodes if "weight" in n.params and packed_param(n, "weight")}


def stored_params(graph: IntGraph) -> dict[str, np.ndarray]:
    """The parameters as they are stored (and passed to the compiled module): int4 weights packed."""
    pk = packed(graph)
    return {k: pack_int4(v) if k in pk else v for k, v in graph.param_arrays().items()}


def params_bytes(graph: IntGraph) -> dict[str, int]:
    """Parameter storage in bytes: fp32 (one float per value), int8 (every weight one byte) and as stored."""
    arrays = graph.param_arrays()
    weights = {k: v for k, v in arrays.items() if k.endswith("/weight")}
    other = sum(v.nbytes for k, v in arrays.items() if k not in weights)
    return {"fp32": 4 * sum(v.size for v in weights.values()) + 4 * sum(
                v.size for k, v in arrays.items() if k.endswith("/bias")),
            "int8": sum(v.size for v in weights.values()) + other,
            "stored": sum(v.nbytes for v in stored_params(graph).values())}


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def is_artifact(path: Path) -> bool:
    """Whether `path` is a folder whose manifest.json says it is an artifact (its files are not checked)."""
    try:
        return path.is_dir() and json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class ArtifactWriter:
    """Claims the artifact folder `out` for this process (see the module docstring); a context manager."""

    def __init__(self, out: Path, overwrite: bool = False) -> None:
        self.out, self.overwrite = Path(out), overwrite
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.lock_path = self.out.parent / f".{self.out.name}.lock"
            self.lock = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DFQFError(f"cannot write {self.out}: {e.strerror or e}") from None
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.lock)
            raise DFQFError(f"another process is writing {self.out} right now; wait for it or choose another --out"
                            ) from None
        try:
            self.check()
            for stale in self.out.parent.glob(f".{self.out.name}.*"):  # a killed writer's leftovers
                if stale.is_dir() and stale != self.lock_path:
                    shutil.rmtree(stale, ignore_errors=True)
        except BaseException:
            self.release()
            raise

    def check(self) -> None:
        """`out` may be written: it does not exist, or it is an artifact and `overwrite` was asked for."""
        out = self.out
        if not (out.exists() or out.is_symlink()):
            return
        if not self.overwrite:
            raise DFQFError(f"{out} already exists (pass --force to replace an artifact folder)")
        if out.is_symlink() or not out.is_dir():
            raise DFQFError(f"--force replaces artifact folders only; {out} is not a folder")
        if not is_artifact(out):
            raise DFQFError(f"--force replaces artifact folders only; {out} holds no artifact manifest "
                            f"(nothing was changed)")

    def write(self, graph: IntGraph, info: dict[str, Any],
              extra: dict[str, Callable[[Path], None]] | None = None) -> dict[str, Any]:
        """Assemble the artifact in a temp sibling and move it to `out`. `extra` maps a file name to a function
        that writes it (e.g. the TVM library, the ONNX file). Returns the manifest."""
        out = self.out
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; an artifact is as readable as any folder
        except OSError as e:
            raise DFQFError(f"cannot write {out}: {e.strerror}") from None
        try:
            pk = packed(graph)
            structure = {**graph.structure(), "packed_int4": sorted(pk),
                         "param_shapes": {k: list(v.shape) for k, v in graph.param_arrays().items()}}
            (tmp / GRAPH).write_text(json.dumps(structure, indent=1) + "\n")
            (tmp / PARAMS).write_bytes(_npz_bytes(stored_params(graph)))
            for name, write in (extra or {}).items():
                write(tmp / name)
            files = sorted(p.name for p in tmp.iterdir())
            manifest = {"format": FORMAT, "version": VERSION, **info,
                        "files": {f: {"sha256": sha256(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            self.check()  # still true: every writer of `out` holds the lock
            if out.exists():  # an artifact, --force: swap, so the old one survives until the new one is in place
                old = out.with_name(f".{out.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DFQFError(f"cannot write {out}: {e.strerror or e}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def release(self) -> None:
        if self.lock is not None:
            try:
                self.lock_path.unlink(missing_ok=True)
            except OSError:
                pass
            os.close(self.lock)
            self.lock = None

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def write_artifact(out: Path, graph: IntGraph, info: dict[str, Any],
                   extra: dict[str, Callable[[Path], None]] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Claim `out`, write the artifact, release it (`ArtifactWriter` in one call)."""
    with ArtifactWriter(out, overwrite) as writer:
        return writer.write(graph, info, extra)


# The manifest's top-level fields that loaders read, with the type each must have when present.
FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "target": str, "target_dict": dict, "schedules": str, "isa_features": list, "student": dict, "input": dict,
    "output": dict, "graph_structure": str, "onnx": dict, "versions": dict, "created": str}


def _check_fields(path: Path, manifest: dict[str, Any]) -> None:
    for key, kind in FIELD_TYPES.items():
        if key in manifest and not isinstance(manifest[key], kind):
            raise DFQFError(f"{path}: malformed manifest field {key!r} ({type(manifest[key]).__name__})")
    student = manifest.get("student", {})
    for key, kind in (("path", str), ("sha256", str), ("quant_config", dict)):
        if key in student and not isinstance(student[key], kind):
            raise DFQFError(f"{path}: malformed manifest field 'student.{key}' ({type(student[key]).__name__})")


def _check_files(path: Path, files: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(files, dict):
        raise DFQFError(f"{path}: 'files' must map file names to their sha256 and size")
    for name, meta in files.items():
        if not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name:
            raise DFQFError(f"{path}: file name {name!r} is not a plain name inside the artifact folder")
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) \
                or not SHA256.fullmatch(meta["sha256"]) or not isinstance(meta.get("bytes"), int):
            raise DFQFError(f"{path}: the entry of {name} needs a sha256 (64 hex digits) and a size in bytes")
    return files


def read_manifest(artifact: Path, required: tuple[str, ...] = (GRAPH, PARAMS)) -> dict[str, Any]:
    """The manifest, after checking that it lists `required` and that every listed file exists and matches
    its size and sha256."""
    artifact = Path(artifact)
    path = artifact / MANIFEST
    if not path.is_file():
        raise DFQFError(f"{artifact} is not a DFQF artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DFQFError(f"{path} is not a valid manifest ({first_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DFQFError(f"{path} is not a valid manifest (format is not {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise DFQFError(f"{path}: unsupported artifact version {manifest.get('version')!r} (expected {VERSION})")
    files = _check_files(path, manifest.get("files"))
    _check_fields(path, manifest)
    missing = [name for name in required if name not in files]
    if missing:
        raise DFQFError(f"{artifact}: the manifest does not list {', '.join(missing)}")
    for name, meta in files.items():
        f = artifact / name
        if f.is_symlink() or not f.is_file():
            raise DFQFError(f"{artifact}: {name} is listed in the manifest but missing (or not a plain file)")
        if f.stat().st_size != meta["bytes"] or sha256(f) != meta["sha256"]:
            raise DFQFError(f"{artifact}: {name} does not match its sha256 in the manifest (corrupted or replaced)")
    return manifest


def load_graph(artifact: Path, verify: bool = True) -> IntGraph:
    """The integer graph of an artifact (int4 weights unpacked); `verify=False` when the caller has just
    checked the manifest (hashing every file again is wasted work). Anything malformed is a DFQFError."""
    artifact = Path(artifact)
    if verify:
        read_manifest(artifact)
    try:
        structure = json.loads((artifact / GRAPH).read_text())
        if not isinstance(structure, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise DFQFError(f"{artifact / GRAPH} is not an integer graph ({first_line(e)})") from None
    try:
        with np.load(artifact / PARAMS, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DFQFError(f"{artifact / PARAMS} is not an integer parameter file ({first_line(e)})") from None
    try:
        shapes = structure.get("param_shapes", {})
        for k in structure.get("packed_int4", []):
            arrays[k] = unpack_int4(arrays[k], tuple(shapes[k]))
        for k, a in arrays.items():
            if a.dtype.kind not in "iu" or (k in shapes and list(a.shape) != list(shapes[k])):
                raise ValueError(f"parameter {k} is {a.dtype}{list(a.shape)}, not integers of shape {shapes.get(k)}")
        return IntGraph.from_parts(structure, arrays)
    except DFQFError as e:
        raise DFQFError(f"{artifact}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise DFQFError(f"{artifact}: malformed integer graph ({first_line(e)})") from None
