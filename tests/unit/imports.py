"""Reading a module's imports from its source (``ast``): every import statement, relative ones
resolved, those nested in functions and under ``TYPE_CHECKING`` included. Used by the
architecture and layer tests.
"""

from __future__ import annotations

import ast

__all__ = ["imported_modules"]


def imported_modules(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Returns: every absolute module name ``source`` (the text of ``module``) imports.

    ``from a import b`` gives both ``a`` and ``a.b``, since ``b`` may be a submodule.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found
