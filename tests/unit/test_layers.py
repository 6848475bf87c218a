"""The whole import graph of the package, ``TYPE_CHECKING`` imports included, against a layer
order: no circles, no upward import, no module over ~800 lines.

A circle hidden under ``TYPE_CHECKING`` is still a circle: the two modules cannot be read,
tested or compiled apart, and a service-locator object (an ``App`` handed everywhere) is
how they start. Each module belongs to one layer; it may import its own layer and the ones
below. A new module must be given a layer here (the test says so).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .imports import imported_modules

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "pgtenant"
ROOT = REPO / PACKAGE
MAX_LINES = 800

# Lowest first. A name ending in ".*" is a package prefix.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("", "compiled", "errors", "logs", "http", "holds", "stats", "identity",
                    "identity.tokens",
                    "identity.throttle", "protocol.constants", "protocol.encoding",
                    "protocol.textcache")),
    ("config", ("config", "configfile")),
    ("identity", ("identity.context", "identity.jwt", "identity.registry")),
    ("protocol", ("protocol", "protocol.*")),
    ("policy", ("guard", "tls", "metrics", "pool_state")),
    # workers: the supervisor and its control sockets (cancel asks a sibling worker).
    ("backend", ("server", "notify", "pool", "cancel", "workers")),
    ("frontend", ("client", "session", "admin", "login", "limits")),
    # The operator's tools (init, tenants, migrations, audit) work on the database, not on
    # a running proxy; the app uses init's lockdown check at start, so they sit below it.
    ("control", ("control", "control.*")),
    ("app", ("app",)),
    # The demo runs a proxy in-process: it composes the app and the tools, like the CLI.
    ("cli", ("cli", "__main__", "control.demo")),
)


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer_of(name: str) -> int | None:
    """Returns: the index in LAYERS of module ``name`` (relative to the package), or None."""
    best: tuple[int, int] | None = None  # (specificity, layer)
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            if member.endswith(".*"):
                prefix = member[:-2]
                if name.startswith(prefix + "."):
                    candidate = (len(prefix), index)
                else:
                    continue
            elif member == name:
                candidate = (len(member) + 1000, index)
            else:
                continue
            if best is None or candidate > best:
                best = candidate
    return None if best is None else best[1]


def graph() -> dict[str, set[str]]:
    """Returns: module -> the package modules it imports (relative names, '' = package)."""
    out: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        full = f"{PACKAGE}.{name}" if name else PACKAGE
        found = imported_modules(path.read_text(), full, is_package=path.name == "__init__.py")
        deps = set()
        for dep in found:
            if dep == PACKAGE:
                rel = ""
            elif dep.startswith(PACKAGE + "."):
                rel = dep[len(PACKAGE) + 1:]
            else:
                continue
            if rel in MODULES and rel != name:
                deps.add(rel)
        out[name] = deps
    return out


def test_every_module_has_a_layer() -> None:
    missing = sorted(n or "(package)" for n in MODULES if layer_of(n) is None)
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


def test_no_upward_import() -> None:
    bad = []
    for name, deps in graph().items():
        mine = layer_of(name)
        for dep in sorted(deps):
            theirs = layer_of(dep)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{name or PACKAGE} ({LAYERS[mine][0]}) imports {dep} "
                           f"({LAYERS[theirs][0]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle() -> None:
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
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
                cycles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles (TYPE_CHECKING imports count): {cycles}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(REPO)}: {lines} lines (> {MAX_LINES})"
