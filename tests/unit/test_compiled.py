"""The compiled protocol core and its pure-Python fallback (issue 16, ``pgtenant/compiled.py``).

``make test`` runs the unit tests twice: on what ``make install`` built (compiled by mypyc
when a C compiler worked) and with ``PGTENANT_PURE=1``. These tests check that the build the
process reports is the one whose modules it actually imported, in both runs.
"""

from __future__ import annotations

import ast
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
    SHARED_LIBS,
    SourceFinder,
    compiled_modules,
    pure_forced,
    stale_modules,
)

REPO = Path(__file__).resolve().parents[2]
PROTOCOL = REPO / "pgtenant" / "protocol"
# Modules of each kind the hot path runs through, the protocol core's and the data path's
# around it; their files say which build was imported.
PROBES = tuple(f"pgtenant.protocol.{m}" for m in (
    "tracker", "frontend", "backend", "ledger", "replies", "codec", "sql")) + tuple(
    f"pgtenant.{m}" for m in (
        "session", "server", "pool", "pool_state", "guard", "stats", "holds"))

_PROBE = """
import importlib, json, sys, pgtenant
files = {m: importlib.import_module(m).__file__ for m in sys.argv[1:]}
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
    import pgtenant.session as session

    kind = pgtenant.build_kind()
    for module in (tracker, session):
        assert module.__file__ is not None
        assert _is_compiled_file(module.__file__) == (kind == COMPILED), (kind, module.__file__)
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


def test_source_finder_finds_top_level_modules_that_were_compiled_only(tmp_path: Path) -> None:
    # The package directory also holds modules never compiled (app, config...): the ordinary
    # finders keep them, and the shared library has no source to be sent back to.
    for name in ("session", "config"):
        (tmp_path / f"{name}.py").write_text("X = 1\n")
    finder = SourceFinder(str(tmp_path), "pgtenant.", frozenset({"session", "_protocol__mypyc"}))
    spec = finder.find_spec("pgtenant.session", None)
    assert spec is not None and spec.origin == str(tmp_path / "session.py")
    assert finder.find_spec("pgtenant.config", None) is None
    assert finder.find_spec("pgtenant._protocol__mypyc", None) is None
    assert finder.find_spec("pgtenant.protocol", None) is None
    assert finder.find_spec("pgtenant.protocol.tracker", None) is None


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


def _setup_names(variable: str) -> list[str]:
    """Returns: the module names of ``variable = [f"..." for name in (...)]`` in setup.py."""
    for node in ast.parse((REPO / "setup.py").read_text()).body:
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == variable and isinstance(node.value, ast.ListComp)):
            names = ast.literal_eval(node.value.generators[0].iter)
            assert isinstance(names, tuple)
            return [str(n) for n in names]
    raise AssertionError(f"no {variable} in setup.py")


def test_the_shared_libraries_checked_at_start_are_the_ones_setup_builds() -> None:
    # compiled.py imports each group's library to decide whether the compiled modules load;
    # a group missing from its list would let a broken build pass for compiled.
    for node in ast.parse((REPO / "setup.py").read_text()).body:
        if isinstance(node, ast.AnnAssign) and ast.unparse(node.target) == "GROUPS":
            assert isinstance(node.value, ast.List)
            groups = [ast.literal_eval(g.elts[1]) for g in node.value.elts
                      if isinstance(g, ast.Tuple)]
            break
    else:
        raise AssertionError("no GROUPS in setup.py")
    assert [f"{g}__mypyc" for g in groups] == list(SHARED_LIBS)
    built = [lib for lib in SHARED_LIBS
             if compiled_modules(str(REPO / "pgtenant")).get(lib.split(".")[1])]
    assert built in ([], list(SHARED_LIBS))  # both built, or neither (a pure install)


def _except_names_of_two_types(tree: ast.AST) -> list[str]:
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            seen: dict[str, set[str]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.ExceptHandler) and node.name:
                    kind = ast.unparse(node.type) if node.type else "BaseException"
                    seen.setdefault(node.name, set()).add(kind)
            out += [f"{fn.name}(): {name} {sorted(kinds)}"
                    for name, kinds in seen.items() if len(kinds) > 1]
    return out


def test_no_compiled_function_binds_one_except_name_to_two_exception_types() -> None:
    # mypyc gives `except A as exc: ... except B as exc:` one variable of the first type:
    # when B is broader (`except ProxyError as exc` then `except Exception as exc`), the
    # compiled handler raises TypeError instead of running, so the error path a bug or a
    # refusal takes is lost (it happened to guard.py's refusals and session.py's bug path).
    paths = [PROTOCOL / f"{name}.py" for name in _setup_names("PROTOCOL")]
    paths += [REPO / "pgtenant" / f"{name}.py" for name in _setup_names("DATA_PATH")]
    assert len(paths) >= 29
    found = [f"{path.name}: {hit}" for path in paths
             for hit in _except_names_of_two_types(ast.parse(path.read_text()))]
    assert found == []


def test_the_except_name_check_sees_one() -> None:
    tree = ast.parse("def f():\n try: pass\n except KeyError as e: pass\n"
                     " except Exception as e: pass\n")
    assert _except_names_of_two_types(tree) == ["f(): e ['Exception', 'KeyError']"]


def test_the_counters_a_login_creates_build_and_count() -> None:
    # Compiled, stats.py's bucket tuples were once native constants never set at import:
    # the first login failed with NameError in the proxy while every other unit test passed.
    from pgtenant.stats import CONNECT_BUCKETS, WAIT_BUCKETS, Histogram, Metrics

    metrics = Metrics()
    labels = metrics.labels("app", "tenant")
    assert metrics.labels("app", "tenant") is labels
    labels.transaction_seconds.observe(0.003)
    labels.query_seconds.observe(100.0)
    assert labels.transaction_seconds.total == 0.003
    metrics.tenant("app", "tenant", "acme").transactions += 1
    for bounds in (CONNECT_BUCKETS, WAIT_BUCKETS):
        histogram = Histogram(bounds)
        histogram.observe(bounds[0])
        assert sum(histogram.counts) == 1
