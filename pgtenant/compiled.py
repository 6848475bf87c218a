"""Which build of the hot path this process runs: compiled by mypyc, or pure Python.

``setup.py`` compiles the modules of ``pgtenant/protocol/`` and the per-transaction data path
(``pgtenant/session.py``, ``server.py``, ``pool.py``...) with mypyc when the installing
machine can (issue 16); their ``.py`` sources are always installed next to the ``.so`` files,
and Python's own import order prefers the ``.so``. ``pgtenant/__init__.py`` calls
``install()`` before anything else of the package is imported, which puts finders in front
of the others that load every protocol module, and every top-level module that has a
compiled file, from its ``.py`` source instead when:

* ``PGTENANT_PURE`` is set (not empty, not ``0``): the pure build, on demand;
* a compiled module is older than its source (an editable install whose sources were edited
  or checked out after the build): it would run the old code, and because compiled modules
  call each other inside their groups' shared libraries (and across them), every compiled
  module goes back to source, not only the edited one;
* a shared library does not load (a wheel built for another interpreter, say).

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

__all__ = ["COMPILED", "PURE", "PURE_ENV", "SHARED_LIBS", "build_kind", "install"]

PURE_ENV = "PGTENANT_PURE"
COMPILED = "compiled (mypyc)"
PURE = "pure Python"

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_PROTOCOL = os.path.join(_PACKAGE, "protocol")
_PREFIX = "pgtenant.protocol."
_TOP = "pgtenant."
# The shared libraries of the compiled groups (setup.py's GROUPS, "<name>__mypyc"). They sit
# in the package directory, next to the compiled top-level modules, and are no modules.
SHARED_LIBS = ("pgtenant._protocol__mypyc", "pgtenant._data_path__mypyc")
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
    """Finds ``<prefix><module>`` at its ``.py`` source in ``directory``, ignoring compiled
    files; only the modules in ``only`` when given (the top-level package holds modules that
    are never compiled, which the ordinary finders keep loading)."""

    def __init__(self, directory: str = _PROTOCOL, prefix: str = _PREFIX,
                 only: frozenset[str] | None = None) -> None:
        self.directory = directory
        self.prefix = prefix
        self.only = only

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if not fullname.startswith(self.prefix):
            return None
        module = fullname[len(self.prefix):]
        if "." in module or (self.only is not None and module not in self.only):
            return None
        source = os.path.join(self.directory, module + ".py")
        if not os.path.isfile(source):
            return None
        return spec_from_file_location(fullname, source)


def _top_level_compiled() -> dict[str, str]:
    """Returns: the compiled top-level modules (``session``...) -> their compiled files."""
    found = compiled_modules(_PACKAGE)
    for lib in SHARED_LIBS:
        found.pop(lib[len(_TOP):], None)
    return found


def _finders() -> list[SourceFinder]:
    """Returns: the finders that send every compiled module back to its source."""
    return [SourceFinder(),
            SourceFinder(_PACKAGE, _TOP, frozenset(_top_level_compiled()))]


def _decide() -> tuple[str, bool]:
    """Returns: (the build kind, whether compiled modules must come from source)."""
    protocol, top = compiled_modules(), _top_level_compiled()
    compiled = bool(protocol or top)
    if pure_forced():
        return f"{PURE} ({PURE_ENV})", compiled
    if not compiled:
        return PURE, False
    stale = stale_modules(protocol) + [f"pgtenant/{m}" for m in stale_modules(top, _PACKAGE)]
    if stale:
        return (f"{PURE} (compiled modules older than their sources: {', '.join(stale)}; "
                "reinstall to compile them again)"), True
    try:
        for lib in SHARED_LIBS:
            importlib.import_module(lib)
    except ImportError as exc:
        return f"{PURE} (the compiled modules do not load: {exc})", True
    return COMPILED, False


_kind: str | None = None


def install() -> None:
    """Decides the build once per process; puts the source finders first when it is pure."""
    global _kind
    if _kind is not None:
        return
    _kind, from_source = _decide()
    if from_source:
        sys.meta_path[:0] = _finders()


def build_kind() -> str:
    """Returns: ``compiled (mypyc)``, ``pure Python``, or ``pure Python (why)``."""
    install()
    assert _kind is not None
    return _kind
