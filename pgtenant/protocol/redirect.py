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

from collections.abc import Mapping, Sequence
from typing import Any, Final

from pglast.parser import ParseError, scan

__all__ = ["CATALOG", "client_statements", "redirect", "render"]

CATALOG: Final = "pg_catalog"
_OPEN: Final = "ASCII_40"  # "("
_DOT: Final = "ASCII_46"  # "."


def _ident(text: str) -> str:
    """Returns: an identifier token's name as Postgres reads it (quotes removed, or folded
    to lower case when unquoted)."""
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        return text[1:-1].replace('""', '"')
    return text.lower()


def redirect(sql: bytes, calls: Mapping[str, str], call_count: int,
             relations: Mapping[str, str] | None = None,
             aliased: Sequence[bool] = ()) -> tuple[bytes, ...] | None:
    """Rewrite calls of the functions named in ``calls`` (lower-case name -> qualified
    replacement) and references to the relations named in ``relations`` (name -> a
    set-returning function taking the client's statements: see ``client_statements``),
    each unqualified or qualified with pg_catalog.

    ``call_count``: how many such calls the parse tree has; ``aliased``: for each such
    relation reference in text order, whether it has an alias (else the function gets the
    relation's name as its alias, so column references keep working). Returns: the text
    in parts, to be joined with the client's statements literal (one part when no relation
    was rewritten); None when the tokens do not match the tree (then refuse).
    """
    relations = relations or {}
    text = sql.decode("latin-1")
    try:
        tokens = scan(text)
    except ParseError:
        return None
    spans: list[tuple[int, int, bytes, bytes | None]] = []
    found_calls = 0
    for i, token in enumerate(tokens):
        if token.name != "IDENT":
            continue
        name = _ident(text[token.start:token.end + 1])
        is_call = i + 1 < len(tokens) and tokens[i + 1].name == _OPEN
        target = calls.get(name) if is_call else relations.get(name)
        if target is None:
            continue
        start = _qualified_start(text, tokens, i)
        if start is None:
            continue  # another schema's object, or a three-part name: not ours
        if is_call:
            found_calls += 1
            spans.append((start, token.end + 1, target.encode(), None))
        else:
            index = len(spans) - found_calls
            if index >= len(aliased):
                return None
            alias = b"" if aliased[index] else b" AS " + name.encode()
            spans.append((start, token.end + 1, target.encode() + b"(", b")" + alias))
    if found_calls != call_count or len(spans) - found_calls != len(aliased):
        return None
    parts: list[bytes] = []
    out = bytearray()
    last = 0
    for start, end, head, tail in spans:
        out += sql[last:start]
        out += head
        if tail is not None:
            parts.append(bytes(out))
            out = bytearray(tail)
        last = end
    out += sql[last:]
    parts.append(bytes(out))
    return tuple(parts)


def _qualified_start(text: str, tokens: Sequence[Any], i: int) -> int | None:
    """Returns: where the name at token ``i`` starts, its pg_catalog qualifier included;
    None when it is qualified with another schema or is a three-part name."""
    if i < 1 or tokens[i - 1].name != _DOT:
        return int(tokens[i].start)
    if i < 2 or tokens[i - 2].name != "IDENT":
        return None
    qualifier = tokens[i - 2]
    if _ident(text[qualifier.start:qualifier.end + 1]) != CATALOG or (
            i >= 3 and tokens[i - 3].name == _DOT):
        return None
    return int(qualifier.start)


def client_statements(statements: Mapping[bytes, tuple[bytes, bytes, bytes]],
                      itself: bytes | None = None) -> bytes:
    """Returns: the SQL literal of a client's prepared statements for
    ``pgtenant.prepared_statements``: a text[] of (server name, client name) pairs, and,
    for a named statement that reads the view, ``itself`` (its client name) paired with
    NULL: its server name hashes this very text, so the function finds it by its text.
    Names are the client's bytes, in its encoding, as its text is; quoted for an array
    element inside a standard-conforming string literal (the only kind the guard lets a
    session have)."""
    items: list[bytes] = []
    for client_name, (global_name, _, _) in statements.items():
        if client_name != itself:
            items += (_element(global_name), _element(client_name))
    if itself is not None:
        items += (b"NULL", _element(itself))
    array = b"{" + b",".join(items) + b"}"
    return b"'" + array.replace(b"'", b"''") + b"'::pg_catalog.text[]"


def _element(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def render(parts: tuple[bytes, ...], literal: bytes) -> bytes:
    """Returns: ``redirect``'s parts joined with ``literal`` (client_statements')."""
    return literal.join(parts)
