"""Structural rules of the source tree, checked by reading it (ast), not by running it.

- pallas_kernels imports nothing from aphrodite_jax, at module level or inside a function;
- no import cycle among the modules of aphrodite_jax, pallas_kernels and serving;
- the architecture names (HF class names, model_type strings) appear in one module,
  aphrodite_jax/models/registry.py;
- serving/ uses only the engine's public face: no `engine.engine`, no private attribute of another object;
- no source file is longer than 600 lines.
Each failure names the file and line (or the cycle) so the fix is obvious.
"""
from __future__ import annotations

import ast
import os
from functools import lru_cache
from typing import Iterator, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("aphrodite_jax", "pallas_kernels", "serving")
SKIP_DIRS = {".git", "__pycache__", "build", "dist", "node_modules", ".venv", "venv", ".pytest_cache",
             ".ruff_cache"}
SOURCE_EXTS = (".py", ".cc", ".h", ".js")
MAX_LINES = 600

ARCH_REGISTRY = "aphrodite_jax/models/registry.py"
HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _walk(top: str, exts: tuple[str, ...]) -> Iterator[str]:
    """Paths relative to ROOT of the files under `top` with one of `exts`, skipping build and cache folders."""
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            if name.endswith(exts):
                yield os.path.relpath(os.path.join(dirpath, name), ROOT).replace(os.sep, "/")


@lru_cache(maxsize=None)
def _tree(rel: str) -> ast.Module:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return ast.parse(f.read(), filename=rel)


def _module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(rel: str) -> bool:
    return rel.endswith("/__init__.py")


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (never executed, so no runtime edge)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                out.update(id(n) for stmt in node.body for n in ast.walk(stmt)
                           if isinstance(n, (ast.Import, ast.ImportFrom)))
    return out


def _imports(rel: str) -> Iterator[tuple[int, str, tuple[str, ...]]]:
    """(line, absolute module, imported names) of every import in the file, at any depth.

    `import a.b` gives ("a.b", ()); `from a.b import c, d` gives ("a.b", ("c", "d")); relative imports
    are resolved against the file's package."""
    tree = _tree(rel)
    skip = _type_checking_only(tree)
    package = _module_name(rel) if _is_package(rel) else _module_name(rel).rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module, tuple(a.name for a in node.names)


# ------------------------------------------------------------------------------------------ kernels
def test_pallas_kernels_import_nothing_from_the_engine():
    bad = [f"{rel}:{line}: imports {mod}" for rel in _walk("pallas_kernels", (".py",))
           for line, mod, _ in _imports(rel) if mod == "aphrodite_jax" or mod.startswith("aphrodite_jax.")]
    assert not bad, "pallas_kernels must not depend on aphrodite_jax:\n" + "\n".join(bad)


# ------------------------------------------------------------------------------------------ cycles
def _module_files() -> dict[str, str]:
    return {_module_name(rel): rel for pkg in PACKAGES for rel in _walk(pkg, (".py",))}


def _import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}, over the modules of PACKAGES.

    An edge goes to the module that the import statement runs: `from pkg import sub` is an edge to
    pkg.sub when that is a module, `from pkg import name` an edge to pkg's __init__. The implicit
    import of parent packages is not an edge (every module would otherwise depend on its package's
    __init__, which is where the re-exports live)."""
    modules = _module_files()
    graph: dict[str, dict[str, int]] = {}
    for name, rel in modules.items():
        edges: dict[str, int] = {}

        def add(target: str, line: int) -> None:
            while target and target not in modules:  # `import a.b.c` of a non-module attribute: nearest module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.setdefault(target, line)

        for line, mod, names in _imports(rel):
            if not names:
                add(mod, line)
                continue
            for n in names:
                sub = f"{mod}.{n}"
                add(sub if sub in modules else mod, line)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One concrete cycle (a list of modules, first repeated last) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan, iterative over the edges of each node
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, edges = work[-1]
            advanced = False
            for w in edges:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return [_path_within(graph, comp) for comp in comps]


def _path_within(graph: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    """A shortest cycle through comp[0] that stays inside the component (breadth-first)."""
    members, start = set(comp), comp[0]
    prev: dict[str, Optional[str]] = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if w in members and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp + [start]


def test_no_import_cycle():
    graph = _import_graph()
    files = _module_files()
    cycles = _cycles(graph)
    lines = []
    for cyc in cycles:
        hops = [f"{a} ({files[a]}:{graph[a][b]})" for a, b in zip(cyc, cyc[1:])]
        lines.append(" -> ".join(hops + [cyc[-1]]))
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(lines)


def test_cycle_finder_finds_a_cycle():
    """The checker itself: a three-module loop and a self-contained chain."""
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}, "e": {}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


# ------------------------------------------------------------------------------------------ architectures
def _docstring_ids(tree: ast.Module) -> set[int]:
    """ids of the string constants that are bare expression statements (docstrings and the like)."""
    return {id(n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}


def test_architecture_names_live_in_one_module():
    """HF architecture names and model_type strings as literals in code (docstrings, tests and docs aside)."""
    found: dict[str, list[str]] = {}
    for top in PACKAGES + ("benchmarks", "scripts"):
        for rel in _walk(top, (".py",)):
            tree = _tree(rel)
            prose = _docstring_ids(tree)
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in prose:
                    continue
                s = node.value
                hits = [a for a in HF_ARCHITECTURES if a in s] + [t for t in MODEL_TYPES if s == t]
                for h in hits:
                    found.setdefault(rel, []).append(f"{rel}:{node.lineno}: {h!r}")
    outside = [hit for rel, hits in sorted(found.items()) if rel != ARCH_REGISTRY for hit in hits]
    assert ARCH_REGISTRY in found, f"{ARCH_REGISTRY} should hold the architecture names"
    assert not outside, f"architecture names outside {ARCH_REGISTRY}:\n" + "\n".join(outside)


# ------------------------------------------------------------------------------------------ serving
def _private_attribute(node: ast.Attribute) -> bool:
    name = node.attr
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _owner(node: ast.expr) -> Optional[str]:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def test_serving_uses_only_the_public_engine():
    bad = []
    for rel in _walk("serving", (".py",)):
        for node in ast.walk(_tree(rel)):
            if not isinstance(node, ast.Attribute):
                continue
            if node.attr == "engine" and _owner(node.value) == "engine":
                bad.append(f"{rel}:{node.lineno}: engine.engine")
            elif _private_attribute(node) and _owner(node.value) not in ("self", "cls"):
                bad.append(f"{rel}:{node.lineno}: private attribute {node.attr} of {ast.unparse(node.value)}")
    assert not bad, "serving/ reaches behind a public API:\n" + "\n".join(bad)


# ------------------------------------------------------------------------------------------ file size
def test_no_source_file_exceeds_600_lines():
    long = []
    for top in sorted(os.listdir(ROOT)):
        if top in SKIP_DIRS or top.startswith(".") or top.endswith(".egg-info"):
            continue
        files = _walk(top, SOURCE_EXTS) if os.path.isdir(os.path.join(ROOT, top)) else (
            [top] if top.endswith(SOURCE_EXTS) else [])
        for rel in files:
            with open(os.path.join(ROOT, rel), encoding="utf-8", errors="replace") as f:
                n = sum(1 for _ in f)
            if n > MAX_LINES:
                long.append(f"{rel}: {n} lines")
    assert not long, f"source files over {MAX_LINES} lines:\n" + "\n".join(long)
