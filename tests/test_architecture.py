"""The folders are the architecture: each imports only the layers below it, and nothing cycles.

Read from the source (every import statement, those inside functions too), so a lazy import that
reaches upward is caught as well as a module-level one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "chat"

# Lower layers first; a module may import its own layer and the layers listed after it in `may_use`.
LAYERS = {
    "chat.conversation": set(),
    "chat.engine": {"chat.conversation"},
    "chat.backends.remote": {"chat.conversation"},
    "chat.backends.local": {"chat.conversation", "chat.engine"},
    "chat.config": {"chat.conversation"},
    "chat.web": {"chat.conversation", "chat.config"},
    "chat.factory": {"chat.conversation", "chat.config", "chat.backends", "chat.engine"},
}
# Third-party packages a layer must never import (a remote-only deployment starts without torch).
FORBIDDEN_PACKAGES = {
    "chat.conversation": {"torch", "transformers", "gradio", "triton", "starlette"},
    "chat.backends.remote": {"torch", "transformers", "gradio", "triton"},
    "chat.engine": {"gradio"},
    "chat.config": {"torch", "transformers", "gradio"},
}
# Gradio's internals: reached only from chat/web/gradio_patches/.
GRADIO_PRIVATE = re.compile(
    r"gradio\.(components|blocks|chat_interface|utils|route_utils|queueing|state_holder|context|routes|helpers|processing_utils|data_classes|server_messages)\b"
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, as absolute names."""
    tree = ast.parse(path.read_text())
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def layer_of(module: str) -> str | None:
    matches = [layer for layer in LAYERS if module == layer or module.startswith(layer + ".")]
    return max(matches, key=len) if matches else None


MODULES = {module_name(p): p for p in CHAT.rglob("*.py")}


def chat_edges():
    for module, path in MODULES.items():
        for imported in imports_of(path):
            if imported in MODULES:
                yield module, imported


def test_every_module_sits_in_a_layer():
    loose = [m for m in MODULES if layer_of(m) is None and m not in {"chat", "chat.backends"}]
    assert loose == []


def test_each_layer_imports_only_the_layers_below_it():
    upward = []
    for module, imported in chat_edges():
        own, other = layer_of(module), layer_of(imported)
        if (
            other is None
            or own is None
            or own == other
            or any(other == x or other.startswith(x + ".") for x in LAYERS[own])
        ):
            continue
        upward.append(f"{module} -> {imported}")
    assert upward == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN_PACKAGES))
def test_a_layer_never_imports_what_it_must_not(layer):
    bad = []
    for module, path in MODULES.items():
        if layer_of(module) != layer:
            continue
        for imported in imports_of(path):
            if imported.split(".")[0] in FORBIDDEN_PACKAGES[layer]:
                bad.append(f"{module} -> {imported}")
    assert bad == []


def test_no_module_imports_itself_back_through_a_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, imported in chat_edges():
        graph[module].add(imported)
    # a package's __init__ importing its own children is not a cycle back to the package
    for module in graph:
        graph[module] = {m for m in graph[module] if not m.startswith(module + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_gradio_internals_are_reached_only_from_gradio_patches():
    reaches = []
    for path in [*CHAT.rglob("*.py"), ROOT / "app.py"]:
        if "gradio_patches" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if GRADIO_PRIVATE.search(line):
                reaches.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert reaches == []
