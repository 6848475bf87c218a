"""The compiled protocol core and its pure-Python fallback (issue 16, ``pgtenant/compiled.py``).

``make test`` runs the unit tests twice: on what ``make install`` built (compiled by mypyc
when a C compiler worked) and with ``PGTENANT_PURE=1``. These tests check that the build the
process reports is the one whose modules it actually imported, in both runs.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import pgtenant
from pgtenant import compiled
from pgtenant.admin import AdminConsole
from pgtenant.compiled import (
    COMPILED,
    PURE,
    PURE_ENV,
    SourceFinder,
    compiled_modules,
    pure_forced,
    stale_modules,
)

REPO = Path(__file__).resolve().parents[2]
PROTOCOL = REPO / "pgtenant" / "protocol"
# Modules of each kind the hot path runs through; their files say which build was imported.
PROBES = ("tracker", "frontend", "backend", "ledger", "replies", "codec", "sql")

_PROBE = """
import importlib, json, sys, pgtenant
files = {m: importlib.import_module("pgtenant.protocol." + m).__file__ for m in sys.argv[1:]}
print(json.dumps({"kind": pgtenant.build_kind(), "files": files}))
"""


def _probe(pure: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != PURE_ENV}
    if pure is not None:
        env[PURE_ENV] = pure
    out = subprocess.run([sys.executable, "-c", _PROBE, *PROBES], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=60)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def _is_compiled_file(path: str) -> bool:
    return not path.endswith(".py")


def test_the_reported_build_is_the_one_this_process_imported() -> None:
    import pgtenant.protocol.tracker as tracker

    kind = pgtenant.build_kind()
    assert tracker.__file__ is not None
    assert _is_compiled_file(tracker.__file__) == (kind == COMPILED), (kind, tracker.__file__)
    if pure_forced():
        assert kind == f"{PURE} ({PURE_ENV})"


def test_pgtenant_pure_imports_every_protocol_module_from_source() -> None:
    for value in ("1", "yes"):
        result = _probe(value)
        assert result["kind"] == f"{PURE} ({PURE_ENV})"
        files = result["files"]
        assert isinstance(files, dict)
        assert all(str(f).endswith(".py") for f in files.values()), files


def test_without_pgtenant_pure_the_compiled_modules_are_used_when_built() -> None:
    built = compiled_modules(str(PROTOCOL))
    for value in (None, "", "0"):
        result = _probe(value)
        files = result["files"]
        assert isinstance(files, dict)
        if built and not stale_modules(built, str(PROTOCOL)):
            assert result["kind"] == COMPILED
            assert all(_is_compiled_file(str(f)) for f in files.values()), files
        else:
            assert str(result["kind"]).startswith(PURE)
            assert all(str(f).endswith(".py") for f in files.values()), files


def test_pure_forced_reads_the_variable() -> None:
    assert not pure_forced({})
    assert not pure_forced({PURE_ENV: ""})
    assert not pure_forced({PURE_ENV: "0"})
    assert pure_forced({PURE_ENV: "1"})


def test_source_finder_finds_protocol_modules_at_their_source_only(tmp_path: Path) -> None:
    (tmp_path / "tracker.py").write_text("X = 1\n")
    (tmp_path / "tracker.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    finder = SourceFinder(str(tmp_path))
    spec = finder.find_spec("pgtenant.protocol.tracker", None)
    assert spec is not None and spec.origin == str(tmp_path / "tracker.py")
    assert finder.find_spec("pgtenant.protocol.missing", None) is None
    assert finder.find_spec("pgtenant.protocol.tracker.x", None) is None
    assert finder.find_spec("pgtenant.server", None) is None
    assert finder.find_spec("tracker", None) is None


def test_compiled_modules_older_than_their_sources_are_stale(tmp_path: Path) -> None:
    suffix = compiled.EXTENSION_SUFFIXES[0]
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.py").write_text("")
        (tmp_path / f"{name}{suffix}").write_bytes(b"")
    (tmp_path / f"nosource{suffix}").write_bytes(b"")
    found = compiled_modules(str(tmp_path))
    assert sorted(found) == ["a", "b", "c", "nosource"]
    base = 1_700_000_000
    for name in ("a", "b", "c"):
        os.utime(tmp_path / f"{name}{suffix}", (base, base))
    os.utime(tmp_path / "a.py", (base - 60, base - 60))  # built after the edit
    os.utime(tmp_path / "b.py", (base + 1, base + 1))  # unpacked a moment after: not stale
    os.utime(tmp_path / "c.py", (base + 60, base + 60))  # edited after the build
    assert stale_modules(found, str(tmp_path)) == ["c"]
    assert compiled_modules(str(tmp_path / "nowhere")) == {}


class _Peer:
    user = "admin"
    peer_host = "127.0.0.1"

    def write(self, data: bytes) -> None:
        raise AssertionError("not used")

    def close(self, reason: str) -> None:
        raise AssertionError("not used")


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("!i", data, pos + 1)
        out.append((data[pos], data[pos + 5: pos + 1 + length]))
        pos += 1 + length
    return out


def _column_names(body: bytes) -> list[str]:
    (count,) = struct.unpack_from("!h", body, 0)
    names, pos = [], 2
    for _ in range(count):
        end = body.index(b"\x00", pos)
        names.append(body[pos:end].decode())
        pos = end + 1 + 18  # table oid, column, type oid, size, modifier, format
    return names


def _values(body: bytes) -> list[str]:
    (count,) = struct.unpack_from("!h", body, 0)
    values, pos = [], 2
    for _ in range(count):
        (size,) = struct.unpack_from("!i", body, pos)
        values.append(body[pos + 4: pos + 4 + size].decode())
        pos += 4 + size
    return values


async def test_show_version_says_which_build_runs() -> None:
    console = AdminConsole(None, _Peer())  # type: ignore[arg-type]  # SHOW VERSION reads no app
    frames = _frames(await console.execute("SHOW VERSION"))
    assert [t for t, _ in frames] == [ord("T"), ord("D"), ord("C")]
    assert _column_names(frames[0][1]) == ["version", "build"]
    assert _values(frames[1][1]) == [f"pgtenant {pgtenant.__version__}", pgtenant.build_kind()]


def test_serve_logs_the_build_at_start(caplog: pytest.LogCaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from pgtenant import app

    def not_run(coro: object) -> None:
        coro.close()  # type: ignore[attr-defined]  # the coroutine main(): never started

    monkeypatch.setattr(app.uvloop, "run", not_run)
    with caplog.at_level("INFO", logger=app.log.name):
        app.serve(None, None)  # type: ignore[arg-type]  # main() never runs: no config read
    assert f"pgtenant {pgtenant.__version__}: protocol core {pgtenant.build_kind()}" in [
        r.getMessage() for r in caplog.records]
