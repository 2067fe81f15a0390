"""The package tree is layered: each package imports only those below it, and no two import each other.

    util < arp < settings < edge < auth, upstream < observability < gateway < runtime

`auth` and `upstream` share a rank and must not import each other. `dev/` may import anything;
nothing imports `dev/` except `runtime/cli.py`, and that one lazily (inside a function), so
`arp-gateway serve` never loads it. Every import counts, those under `TYPE_CHECKING` too: a
type that points up is a dependency that points up, and is named as an interface instead.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import proxy

PACKAGE = Path(proxy.__file__).resolve().parent
RANK = {"util": 0, "arp": 1, "settings": 2, "edge": 3, "auth": 4, "upstream": 4, "observability": 5,
        "gateway": 6, "runtime": 7}
# Known upward edges, each to be removed by the change named (none today).
ALLOWED: set[tuple[str, str]] = set()


def package_of(module: str) -> str | None:
    """`proxy.auth.tokens` -> `auth`; `proxy` itself and `proxy.__main__` -> None (the top)."""
    parts = module.split(".")
    if parts[0] != "proxy" or len(parts) < 2 or parts[1] not in {*RANK, "dev", "data"}:
        return None
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import of a `proxy` module in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # the package a relative import starts from
    found = []
    top_level = {id(node) for node in tree.body}
    # Imports under `if TYPE_CHECKING:` at module level count as module level.
    for node in tree.body:
        if isinstance(node, ast.If):
            top_level |= {id(child) for child in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "proxy"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` may name a module: count the deeper one when it is a package member.
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            elif node.module and node.module.split(".")[0] == "proxy":
                names = [node.module]
            else:
                names = []
        else:
            continue
        found += [(name, node.lineno, id(node) in top_level) for name in names]
    return found


def graph() -> dict[str, set[tuple[str, str]]]:
    """package -> {(imported package, 'file:line')}"""
    edges: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        source = package_of(module_name(path))
        for target, line, _ in imports(path):
            dest = package_of(target)
            if dest is not None and dest != source:
                edges[source or "proxy"].add((dest, f"{path.relative_to(PACKAGE)}:{line}"))
    return edges


def test_no_package_imports_upward() -> None:
    upward = []
    for source, targets in graph().items():
        if source in ("dev", "proxy"):
            continue
        for dest, where in targets:
            if dest == "dev":
                continue  # held by the next test
            if dest == "data":
                continue  # package data, no code
            if (source, dest) in ALLOWED:
                continue
            if RANK[dest] > RANK[source] or (RANK[dest] == RANK[source] and dest != source):
                upward.append(f"{where}: {source} imports {dest}")
    assert not upward, "imports that point up the tree:\n" + "\n".join(sorted(upward))


def test_the_package_graph_has_no_cycle() -> None:
    edges = {source: {dest for dest, _ in targets if (source, dest) not in ALLOWED}
             for source, targets in graph().items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for dest in sorted(edges.get(node, ())):
            if state.get(dest) == 1:
                cycle.extend(stack[stack.index(dest):] + [node, dest] if dest in stack else [node, dest])
                return True
            if dest not in state and visit(dest, [*stack, node]):
                return True
        state[node] = 2
        return False

    for node in sorted(edges):
        if node not in state and visit(node, []):
            break
    assert not cycle, "a cycle between packages: " + " -> ".join(cycle)


def test_only_the_cli_imports_dev_and_only_lazily() -> None:
    users = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if package_of(module_name(path)) == "dev":
            continue
        for target, line, top_level in imports(path):
            if package_of(target) != "dev":
                continue
            if module_name(path) != "proxy.runtime.cli" or top_level:
                users.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}"
                             + (" at module level" if top_level else ""))
    assert not users, "dev/ loaded outside `arp-gateway dev`/`token`:\n" + "\n".join(users)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The parser resolves relative imports the way Python does, so an upward one cannot hide."""
    path = PACKAGE / "edge" / "writer.py"
    found = {name for name, _, _ in imports(path)}
    assert "proxy.arp.answers" in found
    assert package_of("proxy.runtime.health") == "runtime"
    assert package_of("proxy") is None
