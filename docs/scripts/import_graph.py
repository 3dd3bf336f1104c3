"""The import graph of errprop's own modules: cycles and oversized modules (issue 15).

Reads every module under errprop/ with ``ast`` (nothing is imported or run) and lists
  * each import cycle (strongly connected component of more than one module), counting
    imports at module level, inside functions and under ``if TYPE_CHECKING:`` alike:
    a cycle hidden by a function-local import is still a cycle;
  * the modules over the size limit (default 450 lines).
Exit status 1 when there is a cycle or an oversized module (for a future test), else 0.

Run: python docs/scripts/import_graph.py [--limit 450]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "errprop"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, name: str) -> set[str]:
    """The errprop modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("errprop"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("errprop"):
                continue
            found.add(target)
            for alias in node.names:  # `from . import _x` imports the module _x
                found.add(f"{target}.{alias.name}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=450, help="largest module in lines")
    args = ap.parse_args()
    paths = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    # a package's __init__ re-exports: an edge to it stands for the modules it names, so
    # only edges between modules count (the top-level errprop package is the public face)
    graph = {m: {t for t in imports(p, m) if t in paths and t != m and t != "errprop"}
             for m, p in paths.items() if m != "errprop"}
    found = cycles(graph)
    big = [(m, len(p.read_text(encoding="utf-8").splitlines())) for m, p in paths.items()]
    big = sorted(((m, n) for m, n in big if n > args.limit), key=lambda t: -t[1])
    print(f"{len(graph)} modules; {len(found)} import cycle(s); {len(big)} module(s) over "
          f"{args.limit} lines")
    for comp in sorted(found, key=len, reverse=True):
        print(f"  cycle of {len(comp)}: {', '.join(c.removeprefix('errprop.') for c in comp)}")
    for m, n in big:
        print(f"  {n} lines: {m}")
    return 1 if found or big else 0


if __name__ == "__main__":
    sys.exit(main())
