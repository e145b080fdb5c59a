"""The project's import graph: cycles, imports inside functions, and the layer order of convert/.

    .venv/bin/python tools/imports.py          # prints the findings; exit 1 when a rule is broken
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("convert", "eval", "mla_modeling")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(node: ast.ImportFrom, here: str, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = here.split(".") if is_pkg else here.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(path: Path):
    """(imported module, line, inside a function, the line's text) for every project import in ``path``."""
    here = module_name(path)
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                target = _target(child, here, path.name == "__init__.py")
                modules = [f"{target}.{a.name}" for a in child.names]
                names = [m if _is_module(m) else target for m in modules]
            for name in dict.fromkeys(names):
                if name.split(".")[0] in PACKAGES:
                    found.append((_owner(name), child.lineno, inner, lines[child.lineno - 1].strip()))
            visit(child, inner)

    visit(tree, False)
    return found


def _is_module(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _owner(name: str) -> str:
    """The module a dotted name lives in (``convert.save.ShardWriter`` -> ``convert.save``)."""
    while name and not _is_module(name):
        name = name.rpartition(".")[0]
    return name


def graph():
    """({module: modules it imports}, [(file, line, text) of each project import inside a function])."""
    edges = {}
    lazy = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            here = module_name(path)
            edges.setdefault(here, set())
            for target, line, inner, text in imports(path):
                if target != here:
                    edges[here].add(target)
                if inner:
                    lazy.append((path.relative_to(ROOT), line, text))
    return edges, lazy


def cycles(edges: dict) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            strong(v)
    return out


def main() -> int:
    edges, lazy = graph()
    found = cycles(edges)
    for comp in found:
        print("cycle:", " <-> ".join(comp))
    print(f"{len(lazy)} project imports inside functions:")
    for path, line, text in lazy:
        print(f"  {path}:{line}: {text}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
