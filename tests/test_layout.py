"""The package's folders are its architecture: every import points down the layers below, no
two modules import each other (directly or round a loop), and no module outgrows a page or
eight. Read from the source with `ast`, so a violation names the file and the import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mailbridge"

# Lower layers never import higher ones. Groups of one rank (mail and store; receive and web)
# are independent of each other.
RANKS = {
    "outcomes": 0, "clock": 0, "settings": 0, "logs": 0, "__init__": 0,
    "validate": 0.25, "config": 0.5,
    "mail": 1, "store": 1,
    "metrics": 1.5,
    "runtime": 2,
    "outbound": 3,
    "shares": 4,
    "pipeline": 5,
    "receive": 6, "web": 6,
    "schedule": 6.5,
    "service": 7,
    "cli": 8,
    "__main__": 9,
}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def group(module: str) -> str:
    return module.split(".", 1)[0]


def imports(path: Path, known: set[str]) -> set[str]:
    """The mailbridge modules `path` imports (a name imported from a package counts as the
    module of that name when there is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "mailbridge":
            base = node.module.removeprefix("mailbridge").lstrip(".")
            for alias in node.names:
                candidate = f"{base}.{alias.name}".lstrip(".")
                found.add(candidate if candidate in known else base or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mailbridge":
                    found.add(alias.name.removeprefix("mailbridge").lstrip(".") or "__init__")
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def test_every_module_has_a_layer():
    assert {group(m) for m in modules()} <= set(RANKS)


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_point_down(module):
    mine = group(module)
    wrong = [imported for imported in graph()[module]
             if group(imported) != mine and RANKS[group(imported)] >= RANKS[mine]]
    assert not wrong, f"{module} (layer {mine}) imports {wrong} from a layer not below it"


def test_no_import_cycles():
    edges = graph()
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_module_outgrows_its_page(module):
    lines = len(modules()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines"
