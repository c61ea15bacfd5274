"""The package's imports run one way, down the layers (STYLE.md, "The house, floor by floor").

Every ``import`` of a fastres module in the package (at module level or inside a function) is read
from the source with ``ast``; a module may import modules of its own layer or below, never above.
Nothing in the package reads the repository around it (``bench/``, ``tests/``, git).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Layers, bottom first. A module's layer is the first prefix that matches its dotted name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("vocabulary and oracle", ("fastres._specs", "fastres._opset", "fastres._version",
                               "fastres.reference")),
    ("kernels", ("fastres._C", "fastres._C_cudasim", "fastres.triton_kernels")),
    ("backends", ("fastres.backends",)),
    ("functional", ("fastres.functional", "fastres._autograd", "fastres._autograd_block",
                    "fastres._autograd_unit")),
    ("modules", ("fastres.nn", "fastres.models")),
    ("harness", ("fastres.harness",)),
    ("command lines", ("fastres.parity", "fastres.selftest", "fastres.info",
                       "fastres.experiments", "fastres.triton_kernels.lint", "fastres")),
]


def layer_of(name: str) -> int:
    """The layer of the longest prefix of ``name`` in LAYERS."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{name}: in no layer (add it to LAYERS)"
    return best


def _sources() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "fastres").rglob("*.py"):
        if path.parent.name == "triton_kernels" and path.is_symlink():
            continue
        rel = path.relative_to(ROOT).with_suffix("")
        out[".".join(rel.parts).removesuffix(".__init__")] = path
    for path in (ROOT / "triton_kernels").rglob("*.py"):
        rel = path.relative_to(ROOT / "triton_kernels").with_suffix("")
        name = ".".join(("fastres", "triton_kernels", *rel.parts)).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base == "fastres":  # from fastres import x: the submodule x, or a name of fastres
                found += [(node.lineno, f"fastres.{a.name}") for a in node.names]
            else:
                found += [(node.lineno, base)]
    return [(ln, n) for ln, n in found if n == "fastres" or n.startswith("fastres.")]


SOURCES = _sources()


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_imports_run_down_the_layers(module):
    mine = layer_of(module)
    up = []
    for line, name in _imports(module, SOURCES[module]):
        target = name
        if target not in SOURCES and not target.startswith("fastres._C"):
            target = target.rsplit(".", 1)[0]  # from fastres.x import name: a name of fastres.x
        if layer_of(target) > mine:
            up.append(f"{SOURCES[module].relative_to(ROOT)}:{line} imports {name} "
                      f"({LAYERS[layer_of(target)][0]} above {LAYERS[mine][0]})")
    assert not up, "\n".join(up)


def _parents_of_file(node: ast.AST) -> int:
    """How many ``.parent`` follow ``Path(__file__)`` in an attribute chain (0 if none)."""
    n = 0
    while isinstance(node, ast.Attribute):
        n += node.attr == "parent"
        node = node.value
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        node = node.func.value  # .resolve(), .absolute()
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Path" and node.args:
        arg = node.args[0]
        if isinstance(arg, ast.Name) and arg.id == "__file__":
            return n
    return 0


@pytest.mark.parametrize("module", sorted(m for m in SOURCES if ".triton_kernels" not in m))
def test_the_package_reads_no_repository(module):
    """No path above the package (``Path(__file__)`` with more ``.parent`` than lead back to
    fastres/), no git: results live in the user's cache, the commit comes from FASTRES_COMMIT."""
    path = SOURCES[module]
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(ROOT / "fastres").parts)  # parents up to fastres/ itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _parents_of_file(node) > depth:
            raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno} reads above fastres/")
        if isinstance(node, ast.Constant) and node.value in ("git", "rev-parse"):
            raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno} runs git")
