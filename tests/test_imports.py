"""No import cycles among the project's modules (issue #40), read from the source with `ast`.

The graph holds every import of common, jax_impl, torch_impl, bench, measure and tools - those inside
functions too, and importlib.import_module("literal") calls (f-strings are not followed):
- `import a.b` is an edge to a.b;
- `from pkg import name` is an edge to pkg.name where that is a module, else to pkg (its __init__);
- relative imports are resolved against the importing module.
So a submodule that imports a sibling through the package name (`from pkg import sibling`) points
at the sibling, not at the package's __init__ that imports its own submodules: no cycle there. One
that imports a name the __init__ defines or re-exports (`from pkg import load`) points at the
__init__, and a cycle through it counts. Only edges between the project's own modules count; a
module importing itself is not a cycle. A cycle found is printed in the assertion (a -> b -> a).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "jax_impl", "torch_impl", "bench", "measure", "tools")

# Cycles this test tolerates: the set of modules that import each other (a component) -> why, one
# line each. Empty: none is tolerated.
ALLOWED: dict[frozenset[str], str] = {}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of PACKAGES: dotted name -> file (a package's name -> its __init__.py)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_import_module(func: ast.expr) -> bool:
    """importlib.import_module (however it was imported) or __import__."""
    return (isinstance(func, ast.Attribute) and func.attr == "import_module"
            or isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))


def _resolve(name: str, level: int, module: str, is_package: bool) -> str:
    """The absolute name of a (possibly relative) import `name` at `level` inside `module`."""
    if not level:
        return name
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _owner(name: str, modules) -> str | None:
    """The longest prefix of dotted `name` that is one of `modules` (None: not the project's)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules) -> set[str]:
    """The project modules that `module` (source at `path`) imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    targets = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", node.level, module, is_package)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.append(full if full in modules else base)
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                name = arg.value
                if name.startswith("."):  # import_module(".x", package="pkg") with literals
                    pkg = next((k.value for k in node.keywords if k.arg == "package"), None)
                    pkg = pkg if pkg is not None else (node.args[1] if len(node.args) > 1 else None)
                    if not (isinstance(pkg, ast.Constant) and isinstance(pkg.value, str)):
                        continue
                    level = len(name) - len(name.lstrip("."))
                    name = _resolve(name[level:], level, pkg.value, True)
                targets.append(name)
    owners = {_owner(t, modules) for t in targets}
    return {o for o in owners if o is not None and o != module}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    files = module_files(root)
    return {m: imports_of(m, p, files) for m, p in files.items()}


def components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative),
    each sorted: the modules that import each other, directly or not."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return comps


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (a -> ... -> a) per component of `components`."""
    return [_cycle_in(graph, comp) for comp in components(graph)]


def _cycle_in(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest cycle through comp[0] inside the component `comp` (breadth first)."""
    inside, first = set(comp), comp[0]
    parent = {first: None}
    queue = [first]
    for node in queue:
        for nxt in sorted(graph[node] & inside):
            if nxt == first:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1] + [first]
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"no cycle through {first} in {comp}")  # a component always has one


def _show(graph: dict[str, set[str]], comp: list[str]) -> str:
    """A component as the assertion says it: one cycle, then the component's other modules."""
    cycle = _cycle_in(graph, comp)
    rest = sorted(set(comp) - set(cycle))
    return " -> ".join(cycle) + (f"  (the same knot also holds {', '.join(rest)})" if rest else "")


def test_graph_covers_the_packages():
    graph = import_graph()
    for pkg in PACKAGES:
        assert pkg in graph, f"{pkg}/__init__.py not found"
    # an edge of each kind, so a broken parser cannot pass the cycle test by finding nothing
    assert "common.tile_types" in graph["common.tiles"]  # from common.tile_types import ...
    assert "common.config" in graph["common"]  # from common.config import ... (in an __init__)
    assert "jax_impl.runner" in graph["jax_impl"]  # an import inside a function


def test_no_import_cycles():
    graph = import_graph()
    found = [c for c in components(graph) if frozenset(c) not in ALLOWED]
    assert not found, "import cycles (a -> b: a imports b):\n" + "\n".join(_show(graph, c) for c in found)


def test_allow_list_is_current():
    """Every allow-listed cycle still exists, module for module (remove entries once it is gone)."""
    present = {frozenset(c) for c in components(import_graph())}
    stale = [sorted(k) for k in ALLOWED if k not in present]
    assert not stale, f"allow-listed cycles no longer found: {stale}"


def test_finds_a_planted_cycle(tmp_path):
    """The test fails on a cycle: two modules of a copy of one package that import each other, one
    inside a function, one through importlib; the __init__ importing its submodule is no cycle."""
    pkg = tmp_path / "common"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from common.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from common import b\n")
    (pkg / "b.py").write_text("import importlib\nimportlib.import_module('common.a')\n")
    (pkg / "c.py").write_text("from . import a\n")
    for other in PACKAGES[1:]:
        (tmp_path / other).mkdir()
        (tmp_path / other / "__init__.py").write_text("")
    graph = import_graph(tmp_path)
    assert graph["common.c"] == {"common.a"} and graph["common"] == {"common.a"}
    assert cycles(graph) == [["common.a", "common.b", "common.a"]]


# ----- common's rule: never a twin, the frameworks only inside functions --------------------------

FRAMEWORKS = ("jax", "jaxlib", "flax", "torch", "triton")


def _twin(name: str) -> bool:
    """A dotted name, or the text of an importlib string, that names a twin (jax_impl, torch_impl, ...)."""
    return "_impl" in name


def _text(node: ast.expr) -> str | None:
    """The text of a string literal, or of an f-string's literal parts (f"{name}_impl.ops" -> "_impl.ops")."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
    return None


def layering_violations(source: str, filename: str) -> list[str]:
    """"file:line: what" for each import of a twin in `source` (at any depth, also through
    importlib.import_module / __import__ with a literal or an f-string naming one) and each import
    of a framework outside a function."""
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            text = _text(node.args[0])
            if text is not None and _twin(text):
                out.append(f"{filename}:{node.lineno}: imports a twin through importlib ({text!r})")
        if any(_twin(n) for n in names):
            out.append(f"{filename}:{node.lineno}: imports a twin ({', '.join(n for n in names if _twin(n))})")
        elif not in_function and any(n.split(".")[0] in FRAMEWORKS for n in names):
            out.append(f"{filename}:{node.lineno}: imports {names[0]} at module level (only inside functions)")
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(source, filename), False)
    return out


def test_common_imports_no_twin_and_no_framework_at_module_level():
    found = [v for path in sorted((ROOT / "common").rglob("*.py"))
             for v in layering_violations(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, "common must not import a twin, nor jax/torch outside functions:\n" + "\n".join(found)


def test_layering_rule_finds_planted_imports():
    source = ("import importlib\nimport jax\nfrom torch_impl.kernels import mlp\n"
              "def f(name):\n    import torch\n    from jax_impl import ops\n"
              "    importlib.import_module('torch_impl.plain')\n    importlib.import_module(f'{name}_impl.ops')\n"
              "    __import__('jax_impl')\n    importlib.import_module(name)\n")
    found = layering_violations(source, "common/planted.py")
    assert [v.split(": ")[0] for v in found] == [f"common/planted.py:{n}" for n in (2, 3, 6, 7, 8, 9)], found
    assert "module level" in found[0] and "'_impl.ops'" in found[4]
