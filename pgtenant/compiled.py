"""Which build of the protocol core this process runs: compiled by mypyc, or pure Python.

``setup.py`` compiles the modules of ``pgtenant/protocol/`` with mypyc when the installing
machine can (issue 16); their ``.py`` sources are always installed next to the ``.so`` files,
and Python's own import order prefers the ``.so``. ``pgtenant/__init__.py`` calls
``install()`` before anything can import the protocol package, which puts a finder in front
of the others that loads every protocol module from its ``.py`` source instead when:

* ``PGTENANT_PURE`` is set (not empty, not ``0``): the pure build, on demand;
* a compiled module is older than its source (an editable install whose sources were edited
  or checked out after the build): it would run the old code, and because compiled modules
  call each other inside one shared library, the whole core goes back to source, not only
  the edited module;
* the shared library does not load (a wheel built for another interpreter, say).

``build_kind()`` says which it is, for the start-up log line and ``SHOW VERSION``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import EXTENSION_SUFFIXES, ModuleSpec
from importlib.util import spec_from_file_location
from types import ModuleType

__all__ = ["COMPILED", "PURE", "PURE_ENV", "build_kind", "install"]

PURE_ENV = "PGTENANT_PURE"
COMPILED = "compiled (mypyc)"
PURE = "pure Python"

_PROTOCOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "protocol")
_PREFIX = "pgtenant.protocol."
# The shared library of the compiled group (setup.py: group_name "pgtenant._compiled").
_SHARED_LIB = "pgtenant._compiled__mypyc"
# A wheel is unpacked file by file, a module's .py possibly a moment after its .so; an edit
# after a build comes seconds or more later.
_STALE_AFTER = 2.0


def pure_forced(environ: Mapping[str, str] = os.environ) -> bool:
    """Returns: whether the environment asks for the pure build."""
    return environ.get(PURE_ENV, "") not in ("", "0")


def compiled_modules(directory: str = _PROTOCOL) -> dict[str, str]:
    """Returns: protocol module name (``tracker``) -> its compiled file, for those that have one."""
    out: dict[str, str] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return out
    for name in names:
        for suffix in EXTENSION_SUFFIXES:
            if name.endswith(suffix):
                out[name[: -len(suffix)]] = os.path.join(directory, name)
                break
    return out


def stale_modules(compiled: dict[str, str], directory: str = _PROTOCOL) -> list[str]:
    """Returns: the compiled modules whose ``.py`` source is newer than the compiled file."""
    out = []
    for module, path in compiled.items():
        try:
            newer = (os.stat(os.path.join(directory, module + ".py")).st_mtime
                     - os.stat(path).st_mtime)
        except OSError:
            continue  # no source to compare with: the compiled file is all there is
        if newer > _STALE_AFTER:
            out.append(module)
    return sorted(out)


class SourceFinder(MetaPathFinder):
    """Finds ``pgtenant.protocol.<module>`` at its ``.py`` source, ignoring compiled files."""

    def __init__(self, directory: str = _PROTOCOL) -> None:
        self.directory = directory

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if not fullname.startswith(_PREFIX):
            return None
        module = fullname[len(_PREFIX):]
        source = os.path.join(self.directory, module + ".py")
        if "." in module or not os.path.isfile(source):
            return None
        return spec_from_file_location(fullname, source)


def _decide() -> tuple[str, bool]:
    """Returns: (the build kind, whether protocol modules must come from source)."""
    compiled = compiled_modules()
    if pure_forced():
        return f"{PURE} ({PURE_ENV})", bool(compiled)
    if not compiled:
        return PURE, False
    stale = stale_modules(compiled)
    if stale:
        return (f"{PURE} (compiled modules older than their sources: {', '.join(stale)}; "
                "reinstall to compile them again)"), True
    try:
        importlib.import_module(_SHARED_LIB)
    except ImportError as exc:
        return f"{PURE} (the compiled modules do not load: {exc})", True
    return COMPILED, False


_kind: str | None = None


def install() -> None:
    """Decides the build once per process; puts the source finder first when it is pure."""
    global _kind
    if _kind is not None:
        return
    _kind, from_source = _decide()
    if from_source:
        sys.meta_path.insert(0, SourceFinder())


def build_kind() -> str:
    """Returns: ``compiled (mypyc)``, ``pure Python``, or ``pure Python (why)``."""
    install()
    assert _kind is not None
    return _kind
