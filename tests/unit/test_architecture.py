"""The sans-I/O rule for ``pgtenant/protocol``: no I/O modules, no upward imports.

Two checks: a static one (``ast``) over each module's own import statements, including
relative ones and imports nested in functions; and a dynamic one that imports each module in
a fresh interpreter and looks at what ended up in ``sys.modules`` (catches transitive pulls).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .imports import imported_modules

REPO = Path(__file__).resolve().parents[2]
PROTOCOL = REPO / "pgtenant" / "protocol"
MODULES = sorted(p for p in PROTOCOL.glob("*.py"))

IO_MODULES = frozenset(
    {"asyncio", "socket", "logging", "time", "select", "selectors", "ssl", "threading",
     "subprocess"}
)
UPWARD = frozenset({"pgtenant.config", "pgtenant.server", "pgtenant.pool", "pgtenant.client",
                    "pgtenant.session", "pgtenant.app"})
# What a fresh interpreter must not gain by importing a protocol module. ``time`` is left
# out: CPython loads it at start-up, so its presence in sys.modules proves nothing.
RUNTIME_IO = frozenset(IO_MODULES - {"time"} | {"asyncpg", "uvloop"})


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    return imported_modules(
        path.read_text(), _module_name(path), is_package=path.name == "__init__.py"
    )


def _violations(names: set[str], forbidden: frozenset[str]) -> set[str]:
    return {n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)}


# ---------------------------------------------------------------------- the checker itself


def test_relative_imports_are_resolved_against_the_package() -> None:
    source = (
        "from ..config import Config\n"
        "from .. import pool\n"
        "from . import codec\n"
        "import asyncio.events\n"
        "def f():\n    import socket\n"
    )
    names = imported_modules(source, "pgtenant.protocol.example")
    assert _violations(names, UPWARD) == {"pgtenant.config", "pgtenant.config.Config",
                                          "pgtenant.pool"}
    assert _violations(names, IO_MODULES) == {"asyncio.events", "socket"}
    assert "pgtenant.protocol.codec" in names
    assert "pgtenant.protocol.x" in imported_modules("from .x import y", "pgtenant.protocol",
                                                  is_package=True)


# ---------------------------------------------------------------------- static rule


def test_protocol_package_has_the_expected_modules() -> None:
    names = {p.stem for p in MODULES}
    assert {"__init__", "codec", "constants", "handshake", "inject", "startup",
            "tracker"} <= names
    assert set(TRACKER_LAYERS_FLAT) <= names


# The link tracker's parts, in dependency order: a module may import only those of earlier
# layers (tracker.py composes the rest). Keeps the split acyclic (a DAG, not a knot).
TRACKER_LAYERS: tuple[tuple[str, ...], ...] = (
    ("ledger",), ("prepared", "settings"), ("extended",), ("frontend",), ("backend",), ("tracker",))
TRACKER_LAYERS_FLAT = tuple(name for layer in TRACKER_LAYERS for name in layer)


@pytest.mark.parametrize("name", TRACKER_LAYERS_FLAT)
def test_tracker_parts_import_only_earlier_layers(name: str) -> None:
    depth = next(i for i, layer in enumerate(TRACKER_LAYERS) if name in layer)
    allowed = {n for layer in TRACKER_LAYERS[:depth] for n in layer}
    imported = imports_of(PROTOCOL / f"{name}.py")
    parts = {n.rsplit(".", 1)[-1] for n in imported if n.startswith("pgtenant.protocol.")}
    bad = (parts & set(TRACKER_LAYERS_FLAT)) - allowed
    assert not bad, f"{name}.py imports {sorted(bad)}, of its own layer or a later one"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_protocol_module_imports_no_io_module(path: Path) -> None:
    bad = _violations(imports_of(path), IO_MODULES)
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_protocol_module_imports_nothing_above_it(path: Path) -> None:
    bad = _violations(imports_of(path), UPWARD)
    assert not bad, f"{path.name} imports {sorted(bad)}"


# ---------------------------------------------------------------------- what actually loads

_PROBE = """
import json, sys
before = set(sys.modules)
import {module}
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def loaded_by(module: str) -> set[str]:
    """Returns: the modules a fresh interpreter gains by importing ``module``."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(module=module)],
        cwd=REPO, env=env, capture_output=True, text=True, check=True, timeout=60,
    )
    return set(json.loads(out.stdout))


@pytest.fixture(scope="module")
def loaded() -> dict[str, set[str]]:
    return {_module_name(p): loaded_by(_module_name(p)) for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_importing_protocol_module_loads_no_io_module(
    path: Path, loaded: dict[str, set[str]]
) -> None:
    bad = _violations(loaded[_module_name(path)], RUNTIME_IO)
    assert not bad, f"importing {path.name} loads {sorted(bad)}"


def test_codec_handshake_startup_and_constants_load_nothing_above_them(
    loaded: dict[str, set[str]]
) -> None:
    for name in ("codec", "constants", "handshake", "startup"):
        assert not _violations(loaded[f"pgtenant.protocol.{name}"], UPWARD), name


@pytest.mark.parametrize("name", ["inject", *TRACKER_LAYERS_FLAT])
def test_inject_and_tracker_load_nothing_above_them(
    name: str, loaded: dict[str, set[str]]
) -> None:
    bad = _violations(loaded[f"pgtenant.protocol.{name}"], UPWARD)
    assert not bad, f"importing {name} loads {sorted(bad)}"
