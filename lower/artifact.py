"""The compiled-artifact folder (DESIGN §5): written atomically, verified against its manifest on load.

    DIR/manifest.json   format, versions, target, bits per layer, sha256 and size of every other file
    DIR/graph.json      the integer graph's structure (lower.graph) and how its parameters are stored
    DIR/params.npz      integer parameters; weights of <= 4 bits packed two per byte (lower.int4)
    DIR/model.so        the TVM library (relax executable) for the target, when compiled
    DIR/model.onnx      the ONNX QDQ export, when exported
    DIR/tuning.json     the register tiles of the conv kernels (lower.tune), when tuned or given
The folder is assembled in a temporary sibling and renamed into place, so a crash never leaves a
half-written artifact; loading recomputes every sha256 and refuses files that do not match.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.errors import DFQFError
from core.files import sha256_file as sha256

from .graph import IntGraph
from .int4 import pack_int4, unpack_int4

FORMAT, VERSION = "dfqf.artifact", 1
MANIFEST, GRAPH, PARAMS, LIBRARY, ONNX = "manifest.json", "graph.json", "params.npz", "model.so", "model.onnx"
TUNING = "tuning.json"


def packed(graph: IntGraph) -> set[str]:
    """Parameter keys stored two per byte: the weights of layers with <= 4 bits."""
    return {f"{n.name}/weight" for n in graph.nodes if n.op in ("conv2d", "dense") and n.attrs["weight_bits"] <= 4}


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


def write_artifact(out: Path, graph: IntGraph, info: dict[str, Any],
                   extra: dict[str, Callable[[Path], None]] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Assemble the artifact in a temp dir and rename it to `out`. `extra` maps a file name to a function
    that writes it (e.g. the TVM library, the ONNX file). Returns the manifest."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DFQFError(f"{out} already exists (pass --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
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
        if out.exists():  # --force: swap, so the old artifact survives until the new one is complete
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(artifact: Path) -> dict[str, Any]:
    """The manifest, after checking every listed file exists and matches its sha256."""
    artifact = Path(artifact)
    path = artifact / MANIFEST
    if not path.is_file():
        raise DFQFError(f"{artifact} is not a DFQF artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise DFQFError(f"{path} is not a valid manifest ({e})") from None
    for name, meta in files.items():
        f = artifact / name
        if not f.is_file():
            raise DFQFError(f"{artifact}: {name} is listed in the manifest but missing")
        if sha256(f) != meta["sha256"]:
            raise DFQFError(f"{artifact}: {name} does not match its sha256 in the manifest (corrupted or replaced)")
    return manifest


def load_graph(artifact: Path, verify: bool = True) -> IntGraph:
    """The integer graph of an artifact (int4 weights unpacked); `verify=False` when the caller has just
    checked the manifest (hashing every file again is wasted work)."""
    artifact = Path(artifact)
    if verify:
        read_manifest(artifact)
    structure = json.loads((artifact / GRAPH).read_text())
    with np.load(artifact / PARAMS) as z:
        arrays = {k: z[k] for k in z.files}
    shapes = structure.get("param_shapes", {})
    for k in structure.get("packed_int4", []):
        arrays[k] = unpack_int4(arrays[k], tuple(shapes[k]))
    return IntGraph.from_parts(structure, arrays)
