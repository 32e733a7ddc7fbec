"""``core/`` is laid out as drivers/iommufd is, and its imports flow one way.

* ``core/ucmd.py`` (``struct iommufd_ucmd`` and the command table) is a leaf: it imports no
  other module of ``core/`` at run time, so every object module registers its commands there.
* No import inside a function in ``core/`` where a module-level one would do: one that must
  stay (it breaks an import cycle) says so in a comment naming the cycle, on its line or the
  line above (``# cycle: ...``).
* Nothing under ``hw/`` imports ``core/`` (the hardware sits below the iommufd core).
* ``process.py`` and ``failnth.py`` (a user process, fault injection) are not core modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "framework" / "iommufd_model"


def _imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it sits inside a function, skipping the
    ``if TYPE_CHECKING:`` blocks (annotations only, never executed)."""
    out: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) == "TYPE_CHECKING":
                for sub in child.orelse:
                    visit(sub, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((child, in_function))
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, inner)

    visit(tree, False)
    return out


def _module(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        return [f"{base}.{a.name}" for a in node.names] + [base]
    return [a.name for a in node.names]


def test_no_function_level_import_in_core_without_its_cycle() -> None:
    bad = []
    for path in sorted((PKG / "core").glob("*.py")):
        lines = path.read_text().splitlines()
        for node, in_function in _imports(ast.parse(path.read_text())):
            if not in_function:
                continue
            here = lines[node.lineno - 1] + lines[node.lineno - 2]
            if "# cycle:" not in here:
                bad.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "imports inside functions without a '# cycle:' comment:\n" + "\n".join(bad)


def test_ucmd_is_a_leaf() -> None:
    tree = ast.parse((PKG / "core" / "ucmd.py").read_text())
    core = [
        ast.unparse(n)
        for n, _ in _imports(tree)
        if any(m.startswith("iommufd_model.core") for m in _module(n))
    ]
    assert core == []


def test_hw_does_not_import_core() -> None:
    bad = [
        f"{path.name}: {ast.unparse(n)}"
        for path in sorted((PKG / "hw").glob("*.py"))
        for n, _ in _imports(ast.parse(path.read_text()))
        if any(m.startswith("iommufd_model.core") for m in _module(n))
    ]
    assert not bad, bad


def test_process_and_failnth_are_outside_core() -> None:
    assert (PKG / "process.py").is_file() and (PKG / "failnth.py").is_file()
    assert not (PKG / "core" / "process.py").exists()
    assert not (PKG / "core" / "failnth.py").exists()
