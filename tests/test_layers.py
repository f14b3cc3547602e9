"""The package's import graph: no cycles, and lower layers never import higher ones."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "sandbox"


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the sandbox modules it imports (at any depth of its code)."""
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    for cand in (f"{base}.{alias.name}", base):
                        if cand in modules:
                            deps.add(cand)
                            break
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
        graph[name] = deps - {name}
    return graph


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "sandbox.run.runner" in graph and graph["sandbox.run.runner"]
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep) :] + [node, dep]))
            if dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


# The folders are the layers, lowest first: a module may import its own
# layer and those below it, never one above (the CLI is the top).
LAYERS = ["core", "wire", "image", "plan", "confinement", "net", "backends", "features", "run", "cli"]


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return -1  # sandbox itself, __main__, guest_init: outside the layers
    return LAYERS.index(parts[1])


def test_every_module_sits_in_a_layer_folder() -> None:
    strays = [m for m in import_graph() if layer(m) < 0 and m not in ("sandbox", "sandbox.__main__", "sandbox.guest_init")]
    assert strays == []


def test_lower_layers_do_not_import_higher_ones() -> None:
    graph = import_graph()
    upward = [(m, d) for m, deps in graph.items() for d in deps if layer(m) >= 0 and layer(d) > layer(m)]
    assert upward == []


def test_the_run_sees_backends_only_through_their_interface() -> None:
    # The runner meets a backend through sandbox/backends/base.py and its registry: adding one edits neither.
    graph = import_graph()
    for module in ("sandbox.run.runner", "sandbox.run.relay"):
        assert not {d for d in graph[module] if d.startswith(("sandbox.backends.direct", "sandbox.backends.libvirt", "sandbox.backends.pool"))}, module
