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
    assert "sandbox.runner" in graph and graph["sandbox.runner"]
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


def test_lower_layers_do_not_import_higher_ones() -> None:
    graph = import_graph()

    def reach(node: str) -> set[str]:
        seen: set[str] = set()
        todo = [node]
        while todo:
            for dep in graph[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    high = {"sandbox.cli", "sandbox.runner", "sandbox.relay", "sandbox.bench"}
    for low in ("sandbox.protocol", "sandbox.qemu.argv", "sandbox.qemu.bootimages", "sandbox.mounts", "sandbox.backend",
                "sandbox.qemu.backend", "sandbox.confinement.walls", "sandbox.process", "sandbox.cpio"):  # fmt: skip
        assert not reach(low) & high, (low, reach(low) & high)
