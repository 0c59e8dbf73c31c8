"""The package's shape: no import cycles, and the application library loads no supervisor code.

The graph counts every `import` statement anywhere in a module, including those inside
functions and under `if TYPE_CHECKING:`: a cycle of type-only imports is still two modules
that cannot be understood one without the other.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import swapd

PACKAGE = Path(swapd.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


@functools.cache
def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods}
                out |= subs
                if base in mods and len(subs) < len(node.names):  # names from base itself
                    out.add(base)
        out.discard(name)
        graph[name] = out
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_package() -> None:
    graph = _graph()
    assert "swapd.supervisor.core" in graph and "swapd.worker.core" in graph
    assert "swapd.supervisor.fleet" in graph["swapd.supervisor.core"]
    assert "swapd.handoff.codecs" in graph["swapd.handoff"]  # relative imports resolved


def test_a_cycle_would_be_found() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_import_direction() -> None:
    """tools → supervisor → shared; worker/serve → handoff/patch → shared."""
    graph = _graph()
    for name, deps in graph.items():
        for dep in deps:
            if name.startswith(("swapd.worker", "swapd.handoff", "swapd.patch")):
                assert not dep.startswith(("swapd.supervisor", "swapd.cli", "swapd.demo")), \
                    (name, dep)
            if name.startswith(("swapd.handoff", "swapd.patch")):
                assert not dep.startswith("swapd.worker"), (name, dep)


def test_the_application_library_loads_no_supervisor_code() -> None:
    """What an application imports, in a fresh interpreter."""
    code = ("import sys, swapd.worker; "
            "print(sorted(m for m in sys.modules if m.startswith('swapd')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    loaded = eval(out)  # a list of names we printed ourselves
    assert "swapd.worker" in loaded
    assert not [m for m in loaded if m.startswith(("swapd.supervisor", "swapd.cli",
                                                    "swapd.control", "swapd.demo",
                                                    "swapd.loadgen"))], loaded
    # the patch engine stays out of start-up; only the source recorder is loaded
    assert "swapd.patch.api" not in loaded and "swapd.patch.source" in loaded
