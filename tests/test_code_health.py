"""Code-health checks on the source of speechssl/: no import cycle, one Accelerator construction site, the
model-to-trainer contract (no id(batch) side channel, no hasattr probing), and short functions.

Everything is read with ``ast`` (nothing is imported), so a check sees imports inside functions too and ignores
names that appear only in comments or docstrings.
"""
from __future__ import annotations

import ast
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "speechssl"
MAX_FUNCTION_LINES = 60
LONG_MARK = "long:"  # a comment line holding it, directly above a def, gives the reason a function is longer


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources() -> dict[str, tuple[Path, ast.Module]]:
    """{module name: (file, parsed tree)} for every module under speechssl/."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        out[module_name(path)] = (path, ast.parse(path.read_text(), filename=str(path)))
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST):
    """Import / ImportFrom nodes anywhere in ``tree`` (module level and inside functions and classes), except
    those under ``if TYPE_CHECKING:``, which never run."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def import_targets(name: str, path: Path, node: ast.AST, modules: set[str]) -> set[str]:
    """speechssl modules that ``node`` (in module ``name``) imports: ``from P import n`` names module ``P.n`` when
    that is a module, else ``P``; relative imports are resolved against the importing module's package."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if node.level:
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)]
        src = ".".join(base + ([node.module] if node.module else []))
    else:
        src = node.module or ""
    out = set()
    for alias in node.names:
        sub = f"{src}.{alias.name}"
        if sub in modules:
            out.add(sub)
        elif src in modules:
            out.add(src)
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: speechssl modules it imports}, module-level and function-level imports together."""
    srcs = sources()
    modules = set(srcs)
    graph = {}
    for name, (path, tree) in srcs.items():
        edges = set()
        for node in _runtime_imports(tree):
            edges |= import_targets(name, path, node, modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(c)) for c in comps]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (breadth-first)."""
    start = min(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return list(reversed(path)) + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")


def calls(tree: ast.AST, func: str):
    """Call nodes of ``func(...)`` or ``x.func(...)``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == func) or (isinstance(f, ast.Attribute) and f.attr == func):
                yield node


def long_functions() -> list[str]:
    """'file:line name (N lines)' for every function over MAX_FUNCTION_LINES without a reason above its def."""
    out = []
    for _, (path, tree) in sources().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            n = node.end_lineno - node.lineno + 1
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            above = lines[first - 2].strip() if first >= 2 else ""
            if n > MAX_FUNCTION_LINES and not (above.startswith("#") and LONG_MARK in above):
                out.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    return out


# ---------------------------------------------------------------------------------------------------------------
def test_the_checker_sees_relative_function_level_and_package_imports():
    graph = import_graph()
    # module-level relative import, and the package import of a submodule
    assert "speechssl.models.encoder_config" in graph["speechssl.models.encoder"]
    assert "speechssl.models.encoder" in graph["speechssl.models"]
    # function-level: ``from . import io`` in speechssl.models.__getattr__
    assert "speechssl.models.io" in graph["speechssl.models"]
    made_up = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(made_up) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_models_do_not_import_the_data_layer():
    """Models (encoders, objectives) take tensors; reading and batching speech is the data layer's job, so
    speechssl.models never imports speechssl.data (shared signal code lives in speechssl.signal)."""
    found = sorted(f"{m} -> {t}" for m, ts in import_graph().items() if m.startswith("speechssl.models")
                   for t in ts if t.startswith("speechssl.data"))
    assert not found, found


def test_one_accelerator_construction_site():
    sites = sorted(str(path.relative_to(REPO)) for _, (path, tree) in sources().items()
                   if any(True for _ in calls(tree, "Accelerator")))
    assert sites == ["speechssl/train/runtime.py"], sites


def test_no_id_batch_side_channel():
    found = [f"{path.relative_to(REPO)}:{c.lineno}" for _, (path, tree) in sources().items()
             for c in calls(tree, "id") if c.args and isinstance(c.args[0], ast.Name) and c.args[0].id == "batch"]
    assert not found, f"id(batch) at {found}"


def test_trainer_does_not_probe_the_model_with_hasattr():
    path = PKG / "train" / "trainer.py"
    tree = ast.parse(path.read_text())
    found = [c.lineno for c in calls(tree, "hasattr") if c.args and isinstance(c.args[0], ast.Name)
             and c.args[0].id == "model"]
    assert not found, f"hasattr(model, ...) at {path.relative_to(REPO)} lines {found}"


def test_functions_are_short_or_say_why():
    found = long_functions()
    for f in found:
        print("long function:", f)
    assert not found, f"{len(found)} functions over {MAX_FUNCTION_LINES} lines without a '# {LONG_MARK}' reason"
