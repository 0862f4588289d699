"""The package's structure: every module imports alone, no import cycle (counting
imports inside functions), no private name imported from another module, and
data flows one way between the layers (backend <- ops <- nn <- models <- cli)."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastseq"


def _modules() -> Dict[str, Path]:
    """Every module of the package: dotted name -> file (bench/ is installed as fastseq.bench)."""
    out = {}
    for top, pkg in ((PACKAGE, "fastseq"), (ROOT / "bench", "fastseq.bench")):
        for path in sorted(top.rglob("*.py")):
            parts = [pkg] + list(path.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> List[ast.AST]:
    return [node for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, (ast.Import, ast.ImportFrom))]


def _resolve(name: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = name.split(".")
    if not MODULES[name].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges() -> Dict[str, Set[str]]:
    """module -> the fastseq modules it imports, at any depth (functions included).

    ``from a.b import c`` depends on ``a.b.c`` when that is a module, else on
    ``a.b`` (importing a submodule runs its parent packages' ``__init__`` first,
    which Python allows while the parent is half-imported, so that is not an edge).
    """
    graph: Dict[str, Set[str]] = {}
    for name, path in MODULES.items():
        deps = set()
        for node in _imports(name, path):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in MODULES)
            else:
                mod = _resolve(name, node)
                if not mod.startswith("fastseq"):
                    continue
                for alias in node.names:
                    sub = f"{mod}.{alias.name}"
                    deps.add(sub if sub in MODULES else mod)
        graph[name] = {d for d in deps if d != name}
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles(_edges()) == []


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# What each layer may import from fastseq besides itself (data flows one way:
# backend <- ops <- nn <- models (seq2seq, lm); data, training and sampling are shared
# by the models; fileio
# is the bottom; the top-level package and the CLI may import anything).
ALLOWED = {
    "fastseq.fileio": (),
    "fastseq.backend": (),
    "fastseq.ops": ("fastseq.backend",),
    "fastseq.nn": ("fastseq.backend", "fastseq.ops"),
    "fastseq.data": ("fastseq.fileio",),
    "fastseq.training": ("fastseq.fileio",),
    "fastseq.sampling": (),
    "fastseq.seq2seq": ("fastseq.fileio", "fastseq.data", "fastseq.training", "fastseq.sampling",
                        "fastseq.backend", "fastseq.ops", "fastseq.nn"),
    "fastseq.lm": ("fastseq.fileio", "fastseq.data", "fastseq.training", "fastseq.sampling",
                   "fastseq.backend", "fastseq.ops", "fastseq.nn"),
}
TOP = ("fastseq", "fastseq.cli", "fastseq.__main__")
# The benchmark suite sits above everything, beside the CLI.
BENCH = "fastseq.bench"


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_every_module_has_a_layer():
    assert [n for n in MODULES if n not in TOP and not _in(n, BENCH)
            and not any(_in(n, layer) for layer in ALLOWED)] == []


def test_layers_import_downwards_only():
    bad = []
    for name, deps in _edges().items():
        if name in TOP or _in(name, BENCH):
            continue
        layer = next(layer for layer in ALLOWED if _in(name, layer))
        ok = (layer,) + ALLOWED[layer]
        bad += [f"{name} -> {d}" for d in deps if not any(_in(d, p) for p in ok)]
    assert bad == []


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for name, path in MODULES.items():
        for node in _imports(name, path):
            if isinstance(node, ast.ImportFrom) and _resolve(name, node).startswith("fastseq"):
                mod = _resolve(name, node)
                bad += [f"{name}: from {mod} import {a.name}" for a in node.names
                        if a.name.startswith("_") and f"{mod}.{a.name}" not in MODULES]
    assert bad == []


def test_every_module_imports_alone():
    """Each module in a fresh process (torch imported first, then forked: every
    child starts without any fastseq module), so no module relies on another
    having been imported before it."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    script = textwrap.dedent("""
        import importlib, os, sys, traceback
        import torch  # the heavy dependency, shared by the children
        failed = []
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if status:
                failed.append(name)
        print("FAILED", failed)
        sys.exit(1 if failed else 0)
    """)
    names = [n for n in MODULES if not n.endswith("__main__")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "FAILED []" in proc.stdout
