"""Build: the protocol core compiled with mypyc when this machine can, pure Python otherwise.

Everything else about the package is in pyproject.toml; this file only adds the compiled
modules (issue 16). ``pip install .`` and ``pip install -e .`` (``make install``) compile the
modules in ``COMPILED`` with mypyc (shipped with mypy, a build requirement) when a C compiler
and the Python headers work. When compiling fails, the same install goes on without them and
says so: the pure ``.py`` modules are the fallback, always installed next to the compiled
ones. ``PGTENANT_PURE=1`` skips compiling; at run time it makes the process import the pure
modules even where compiled ones exist (``pgtenant/compiled.py``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The sans-I/O core, per transaction first. Left out: protocol/__init__.py (a docstring) and
# protocol/refusal.py (``RefusalText`` subclasses ``str``, which mypyc refuses for native
# classes; refusals are rare, nothing is gained).
PROTOCOL = [
    f"pgtenant/protocol/{name}.py"
    for name in (
        "backend", "codec", "constants", "encoding", "frames", "freshness", "frontend",
        "handshake", "inject", "ledger", "listen", "local", "prepared", "pump", "redirect",
        "replay", "replies", "settings", "sql", "startup", "textcache", "tracker",
        "extended",  # frontend.py's extended-protocol handlers (split off, issue 16)
    )
]
# The per-transaction data path around it (issue 16, lever 1 continued); their classes are
# native. Left out: client.py. mypyc compiles it, but a native class with a Python base
# (ClientConnection subclasses asyncio.Protocol) gets an instance __dict__ slot, and a
# client's object must have none (issue 16, tests/unit/test_idle_memory.py); one per server,
# ServerConnection may. A module that tests monkeypatch stays out too (a compiled module's
# functions call each other directly, past the patch): none of these is patched.
DATA_PATH = [
    f"pgtenant/{name}.py"
    for name in ("session", "server", "pool", "pool_state", "guard", "stats", "holds")
]
COMPILED = PROTOCOL + DATA_PATH
# The shared libraries (pgtenant/compiled.py's SHARED_LIBS must name the same).
GROUPS: list[tuple[list[str], str | None]] = [
    (PROTOCOL, "pgtenant._protocol"), (DATA_PATH, "pgtenant._data_path")]


class BuildFailed(Exception):
    """Compiling the extensions failed: install the pure modules instead."""


class _BuildExt(build_ext):
    """build_ext whose failure to compile falls back instead of failing the install."""

    def finalize_options(self) -> None:
        super().finalize_options()
        # The groups' libraries compile side by side, one per core (distutils' own -j).
        if not self.parallel:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        # Always compile: mypyc rewrites a C file only when it changes, so after an edit that
        # leaves the C as it was (a comment), build_ext would keep the old .so, older than
        # its source, which pgtenant/compiled.py then takes for stale and does not use.
        self.force = True
        try:
            super().run()
        except Exception as exc:  # no compiler found, no headers: setuptools' own errors
            raise BuildFailed(str(exc)) from exc

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # the compiler or the linker failed on this extension
            raise BuildFailed(str(exc)) from exc


def _say(text: str) -> None:
    # pip shows a build's output only with -v (or when the build fails), so `make install`
    # also prints pgtenant.build_kind() once installed; SHOW VERSION and the log say it too.
    print(f"pgtenant: {text}", file=sys.stderr, flush=True)


# The commands pip runs this file for before it builds (PEP 517's requirements and metadata
# hooks): they read the metadata only, so translating the modules for them (about 20 s of
# CPU each) would be wasted. The build itself (editable_wheel, bdist_wheel, build_ext)
# translates them once.
_METADATA_ONLY = {"egg_info", "dist_info"}


def _metadata_only(argv: list[str]) -> bool:
    commands = [arg for arg in argv[1:] if not arg.startswith("-")]
    return bool(commands) and commands[0] in _METADATA_ONLY


def _ext_modules() -> list[Any]:
    if os.environ.get("PGTENANT_PURE", "") not in ("", "0"):  # as pgtenant/compiled.py reads it
        _say("PGTENANT_PURE is set: installing the pure-Python protocol core")
        return []
    if _metadata_only(sys.argv):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _say("mypyc is not available: installing the pure-Python protocol core")
        return []
    # Two groups, each one shared library named inside the package (pgtenant/_protocol__mypyc
    # .*.so, pgtenant/_data_path__mypyc.*.so) so that editable installs, whose import path is
    # the package directory, find them. Within a group modules call each other natively
    # (inlined where the C compiler sees fit); across the two, through a table of function
    # pointers, which costs little: the data path calls into the protocol core a few times a
    # transaction. Two libraries are two C compilations of about the same size, run side by
    # side (_BuildExt): the clean-clone CI's install, compile included, went from 3m14 to
    # 2m14 on two cores (CI has a 15-minute budget and compiles once per run).
    try:
        return list(mypycify(COMPILED, opt_level="3", separate=GROUPS))
    except (Exception, SystemExit) as exc:  # mypyc exits on a type error it finds
        _say(f"mypyc could not translate the protocol core ({exc!r}): installing the "
             "pure-Python modules")
        return []


def _setup(ext_modules: list[Any]) -> None:
    setup(ext_modules=ext_modules, cmdclass={"build_ext": _BuildExt})


extensions = _ext_modules()
try:
    _setup(extensions)
except BuildFailed as exc:
    if not extensions:
        raise
    _say(f"compiling the protocol core failed ({exc}); installing the pure-Python modules")
    _setup([])
else:
    if extensions:
        _say("protocol core and data path compiled with mypyc")
