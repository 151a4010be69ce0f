"""The package's shape, for reviews of its layout: import circles and the largest modules.

    python tools/package_shape.py [PACKAGE_DIR] [--max-lines 500]

Reads every module's imports with `ast` (module-level and inside functions alike, relative ones
resolved; an import by string name such as importlib.import_module is not an edge), prints the
strongly connected components of more than one module (import circles) and the modules over
--max-lines lines. Exit status 1 when there is a circle or an oversized module.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Dict, List, Set


def module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(root))[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imports_of(root: str, path: str, modules: Set[str]) -> Set[str]:
    name = module_name(root, path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            # `from pkg import sub` imports pkg (its __init__ runs) and pkg.sub
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph(root: str) -> Dict[str, Set[str]]:
    paths = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".py")]
    modules = {module_name(root, p): p for p in paths}
    return {name: imports_of(root, path, set(modules)) for name, path in modules.items()}


def circles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "openrlhf_sapo"))
    parser.add_argument("--max-lines", type=int, default=500)
    args = parser.parse_args(argv)
    root = os.path.abspath(args.package)
    edges = graph(root)
    found = circles(edges)
    print(f"{len(edges)} modules, {sum(len(v) for v in edges.values())} imports, {len(found)} import circles")
    for component in found:
        print(f"  circle of {len(component)}: {', '.join(component)}")
    sizes = sorted(((sum(1 for _ in open(os.path.join(d, f))), os.path.relpath(os.path.join(d, f), os.path.dirname(root)))
                    for d, _, files in os.walk(root) for f in files if f.endswith(".py")), reverse=True)
    large = [(n, p) for n, p in sizes if n > args.max_lines]
    print("largest: " + ", ".join(f"{p} {n}" for n, p in sizes[:5]))
    for n, p in large:
        print(f"  over {args.max_lines} lines: {p} ({n})")
    return 1 if found or large else 0


if __name__ == "__main__":
    sys.exit(main())
