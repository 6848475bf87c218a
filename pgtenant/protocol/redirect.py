"""Function calls in a tenant's SQL sent to pgtenant's safe stand-ins instead.

Owns the one text rewrite the statement guard makes to statements it allows: a call of a
built-in that tenants may not execute (``set_config``) becomes a call of the function
``pgtenant init`` installs in its place (``pgtenant.set_config``), which Postgres runs with
its own checks (control/safe_settings.py). No I/O.

How: the guard counts, in the parse tree, the calls to redirect (unqualified or
``pg_catalog.``-qualified names); this module finds the same calls in the token stream of
Postgres's own scanner and splices the new name over the old one. The text is scanned as
Latin-1, so that character offsets are byte offsets whatever the client's encoding (every
byte of 0x80 and above is an identifier byte to Postgres's lexer, one character here or
two). When the number of calls found in the tokens is not the number in the tree (a
``U&"..."`` name, something unforeseen), nothing is rewritten and the caller refuses the
statement: fail closed. Error positions Postgres reports after a rewritten call are off by
the difference in length; they are not shifted back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from pglast.parser import ParseError, scan

__all__ = ["CATALOG", "redirect_calls"]

CATALOG: Final = "pg_catalog"
_OPEN: Final = "ASCII_40"  # "("
_DOT: Final = "ASCII_46"  # "."


def _ident(text: str) -> str:
    """Returns: an identifier token's name as Postgres reads it (quotes removed, or folded
    to lower case when unquoted)."""
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        return text[1:-1].replace('""', '"')
    return text.lower()


def redirect_calls(sql: bytes, targets: Mapping[str, str], expected: int) -> bytes | None:
    """Rewrite calls of the functions named in ``targets`` (lower-case name -> qualified
    replacement), unqualified or qualified with pg_catalog.

    ``expected``: how many such calls the parse tree has. Returns: the new text, or None
    when the calls found in the tokens are not exactly ``expected`` (then refuse).
    """
    text = sql.decode("latin-1")
    try:
        tokens = scan(text)
    except ParseError:
        return None
    spans: list[tuple[int, int, str]] = []
    for i, token in enumerate(tokens):
        if token.name != "IDENT" or i + 1 >= len(tokens) or tokens[i + 1].name != _OPEN:
            continue
        target = targets.get(_ident(text[token.start:token.end + 1]))
        if target is None:
            continue
        start = token.start
        if i >= 1 and tokens[i - 1].name == _DOT:
            if i < 2 or tokens[i - 2].name != "IDENT":
                continue
            qualifier = tokens[i - 2]
            if _ident(text[qualifier.start:qualifier.end + 1]) != CATALOG or (
                    i >= 3 and tokens[i - 3].name == _DOT):
                continue  # another schema's function, or a three-part name: not ours
            start = qualifier.start
        spans.append((start, token.end + 1, target))
    if len(spans) != expected:
        return None
    out = bytearray()
    last = 0
    for start, end, target in spans:
        out += sql[last:start]
        out += target.encode()
        last = end
    out += sql[last:]
    return bytes(out)
