"""The package layout: imports point down the stack core < train < lower < runtime < benchmarks, `lower/`
takes from `train/` only the student format and the quant core, and no module imports itself back through
others (imports inside functions included; `if TYPE_CHECKING:` blocks excluded, they never run)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["core", "train", "lower", "runtime", "dfqf", "benchmarks"]
LOWER_MAY_USE = ("train.student", "train.quant")  # what lower/ lowers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str] | None = None) -> set[str]:
    """Project modules `path` imports (absolute names), outside `if TYPE_CHECKING:` blocks; `from pkg import
    module` counts as an import of the module (of `pkg` itself when `modules` does not know pkg.module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names}
            known_subs = subs & (modules or set())
            found.update(known_subs if known_subs == subs else {base} | known_subs)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m.split(".")[0] in LAYERS}


def graph() -> dict[str, set[str]]:
    files = [p for layer in LAYERS for p in (REPO / layer).rglob("*.py")]
    known = {module_name(p) for p in files}
    return {module_name(p): {m for m in imports(p, known) if m in known and m != module_name(p)} for p in files}


def test_imports_point_down_the_stack() -> None:
    wrong = []
    for module, deps in graph().items():
        layer = LAYERS.index(module.split(".")[0])
        for dep in deps:
            if LAYERS.index(dep.split(".")[0]) > layer:
                wrong.append(f"{module} -> {dep}")
            if module.startswith("lower") and dep.startswith("train") and not dep.startswith(LOWER_MAY_USE):
                wrong.append(f"{module} -> {dep} (lower/ lowers the student and the quant core only)")
    assert not wrong, wrong


def test_no_import_cycle() -> None:
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def cycle_from(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for dep in sorted(g[m]):
            if state.get(dep) == 1:
                return path + [m, dep]
            if dep not in state:
                found = cycle_from(dep, path + [m])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            found = cycle_from(m, [])
            assert found is None, " -> ".join(found)


def test_the_checker_sees_a_lazy_upward_import(tmp_path: Path) -> None:
    """The scan counts imports inside functions (the circle this layout replaced was one)."""
    path = REPO / "core" / "_probe_layout.py"
    path.write_text("def f():\n    from runtime.model import load\n    return load\n")
    try:
        assert "runtime.model" in imports(path)
    finally:
        path.unlink()


def test_readme_layout_names_every_module() -> None:
    """Every module of the packages appears in the README's layout section (by file or folder name)."""
    text = (REPO / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    missing = [str(p.relative_to(REPO)) for layer in LAYERS for p in (REPO / layer).rglob("*.py")
               if p.name != "__init__.py" and p.name not in layout and p.stem not in layout]
    assert not missing, f"README layout lacks {missing}"
