"""The package's shape: its import graph (read with `ast`, nothing imported) has no circles, no
module reads another's private names, no module outgrows 800 lines, every import inside a
function says why it is there, and `import safecode_guard` loads no heavy dependency."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import safecode_guard

ROOT = Path(safecode_guard.__file__).resolve().parent
PKG = ROOT.name
MAX_LINES = 800
#: Modules allowed past MAX_LINES, each with its reason. Keep it short; prefer splitting.
LONG_MODULE_EXCEPTIONS: dict[str, str] = {}


@dataclass
class Imports:
    """What one module imports from the package."""

    path: Path
    edges: set[str] = field(default_factory=set)
    """Modules it imports at run time (top level or inside functions; not `if TYPE_CHECKING`)."""
    private: list[str] = field(default_factory=list)
    """`module.name` for each private name it imports from another module."""
    inner: list[int] = field(default_factory=list)
    """Line numbers of imports inside functions or classes (not `if TYPE_CHECKING`)."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module an `import` in `current` names (`level` leading dots)."""
    if level == 0:
        return module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of every node under an `if TYPE_CHECKING:` block (never run)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def read_graph() -> dict[str, Imports]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, Imports] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        info = graph[name] = Imports(path)
        never_run = type_checking_nodes(tree)
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(name, path.name == "__init__.py", node.level, node.module)
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                target = next((a.name for a in node.names if a.name.split(".")[0] == PKG), "")
                names = []
            else:
                continue
            if not target.startswith(PKG) or id(node) in never_run:
                continue
            # `from .pkg import module` imports that module; `from .module import name` the module
            hits = [t for t in (target, *(f"{target}.{n}" for n in names)) if t in modules]
            info.edges.update(h for h in hits if h != name)
            if id(node) not in top_level and not _guarded_at_top(tree, node):
                info.inner.append(node.lineno)
            info.private += [
                f"{target}.{n}" for n in names
                if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in modules
            ]
    return graph


def _guarded_at_top(tree: ast.Module, node: ast.AST) -> bool:
    """Whether `node` sits in a top-level `try:` (an optional dependency's import guard)."""
    return any(
        isinstance(stmt, ast.Try) and any(node is n for n in ast.walk(stmt)) for stmt in tree.body
    )


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


GRAPH = read_graph()


def test_the_graph_reads_the_whole_package() -> None:
    assert {"safecode_guard.langchain.chat_model", "safecode_guard.engine.core", "safecode_guard.nemo"} <= set(GRAPH)
    assert "safecode_guard.judges.factory" in GRAPH["safecode_guard.engine.core"].edges
    assert GRAPH["safecode_guard.nemo.provider"].inner  # the model stack loads on first use there


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    found = cycles({name: info.edges & set(GRAPH) for name, info in GRAPH.items()})
    assert found == [], f"import circles (break them by moving the shared code down a layer): {found}"


def test_no_module_imports_another_modules_private_names() -> None:
    private = {name: info.private for name, info in GRAPH.items() if info.private}
    assert private == {}, f"private names imported across modules (make them public or move them): {private}"


def test_no_module_over_800_lines() -> None:
    long = {
        name: n
        for name, info in GRAPH.items()
        if (n := len(info.path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
        and name not in LONG_MODULE_EXCEPTIONS
    }
    assert long == {}, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_imports_inside_functions_say_why() -> None:
    """An import inside a function is for an optional or heavy dependency, and a comment says so
    (on the line above the import group); one that only dodges a circle belongs at the top."""
    silent = []
    for name, info in GRAPH.items():
        lines = info.path.read_text(encoding="utf-8").splitlines()
        for lineno in info.inner:
            i = lineno - 2  # the line above, 0-based
            while i >= 0 and lines[i].lstrip().startswith(("from ", "import ")):
                i -= 1
            if i < 0 or not lines[i].lstrip().startswith("#"):
                silent.append(f"{name}:{lineno}")
    assert silent == [], f"imports inside functions with no comment saying why: {silent}"


def test_import_safecode_guard_loads_no_heavy_dependency() -> None:
    code = (
        "import sys, safecode_guard; "
        "print(sorted(m for m in ('torch', 'transformers', 'langchain_core') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
