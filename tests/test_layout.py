"""The layout the README promises: core and tools apart, no import cycles, no torch in the core.

Reads every module of the four packages with :mod:`ast` (static imports; those under
``if TYPE_CHECKING:`` excluded, imports inside functions included) and checks the graph. Also
imports ``pccl`` in a fresh interpreter to prove that neither torch nor a tool is loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "pccl": "pccl",
    "pccl.master": "master",
    "pccl.peer": "peer",
    "pccl.bindings": "bindings",
}
CORE = ("pccl", "pccl.master", "pccl.peer")
#: the ``pccl`` command: it lists the tools' sub-commands (importing the one that runs), so it is
#: the front end, not the library
FRONT_END = ("pccl.cli",)


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in (ROOT / folder).rglob("*.py"):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = f
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str | None:
        if name == "pccl._native":
            return None  # the C extension imports nothing of ours
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():

        def visit(node: ast.AST, mod: str = mod) -> None:
            for ch in ast.iter_child_nodes(node):
                if isinstance(ch, ast.If) and "TYPE_CHECKING" in ast.unparse(ch.test):
                    continue
                if isinstance(ch, ast.Import):
                    targets = [a.name for a in ch.names]
                elif isinstance(ch, ast.ImportFrom) and ch.module and not ch.level:
                    subs = [f"{ch.module}.{a.name}" for a in ch.names]
                    targets = [s for s in subs if s in mods or s == "pccl._native"] or [ch.module]
                else:
                    visit(ch)
                    continue
                for t in targets:
                    r = resolve(t) if t.startswith("pccl") else None
                    if r and r != mod:
                        graph[mod].add(r)
                    if t.split(".")[0] in ("torch",):
                        graph[mod].add("torch")

        visit(ast.parse(path.read_text()))
    return graph


def _in_core(mod: str) -> bool:
    if mod in FRONT_END:
        return False
    return mod.startswith(CORE) and not mod.startswith(("pccl.tools", "pccl.bindings"))


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w == "torch":
                continue
            if w not in index:
                strong(w)
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    # the package __init__ re-exports its modules; a module importing a name from the package
    # is not a cycle among modules
    cycles = [c for c in cycles if not (len(c) == 2 and "pccl" in c)]
    assert not cycles, cycles


def test_core_imports_neither_tools_nor_torch_nor_bindings() -> None:
    graph = _graph()
    bad = {
        m: sorted(t for t in deps if t == "torch" or t.startswith(("pccl.tools", "pccl.bindings")))
        for m, deps in graph.items()
        if _in_core(m)
    }
    assert not {m: d for m, d in bad.items() if d}, bad
    assert any(m.startswith("pccl.tools.") for m in graph)  # the tools are where they should be


def test_import_pccl_loads_no_torch_and_no_tool() -> None:
    code = (
        "import sys, pccl, pccl.aio, pccl.master; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('pccl.tools', "
        "'pccl.bindings'))]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
