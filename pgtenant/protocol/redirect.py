"""Function calls and views in a tenant's SQL sent to pgtenant's stand-ins instead.

Owns the one text rewrite the statement guard makes to statements it allows:

* a call of a built-in tenants may not execute becomes a call of the function ``pgtenant
  init`` installs in its place, which Postgres runs with its own checks:
  ``set_config`` -> ``pgtenant.set_config`` (control/safe_settings.py), and
  ``pg_terminate_backend(...)`` -> ``pgtenant.pg_terminate_backend(<the client's pid>, ...)``
  (control/client_views.py: a session may end only its own backend);
* a reference to a view of the server session's state becomes a call of a function given
  the client's own share of it: ``pg_prepared_statements`` ->
  ``pgtenant.prepared_statements(<the client's statements>) AS pg_prepared_statements``.

What only the proxy knows of the client (its statements, its pid) goes in holes the
frontend fills for each use (``render``); the rest is decided once per text and cached. No
I/O.

How: the guard counts, in the parse tree, the calls and views to redirect (unqualified or
``pg_catalog.``-qualified names); this module finds the same ones in the token stream of
Postgres's own scanner and splices the new text over the old. The text is scanned as
Latin-1, so that character offsets are byte offsets whatever the client's encoding (every
byte of 0x80 and above is an identifier byte to Postgres's lexer, one character here or
two). When what the tokens show is not what the tree has (a ``U&"..."`` name, a CTE named
like the view, something unforeseen), nothing is rewritten and the caller refuses the
statement: fail closed. Error positions Postgres reports after a rewrite are off by the
difference in length; they are not shifted back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from pglast.parser import ParseError, scan

from .prepared import PreparedStatements

__all__ = ["CATALOG", "CLIENT_PID", "STATEMENTS", "client_statements", "fill", "redirect",
           "render"]

CATALOG: Final = "pg_catalog"
# Holes in a rewritten text, filled per use. They start with a NUL byte, which no text a
# client sends can contain, so they never mistake the client's own words for a hole.
STATEMENTS: Final = b"\x00statements"
CLIENT_PID: Final = b"\x00client_pid"
_OPEN: Final = "ASCII_40"  # "("
_DOT: Final = "ASCII_46"  # "."


def _ident(text: str) -> str:
    """Returns: an identifier token's name as Postgres reads it (quotes removed, or folded
    to lower case when unquoted)."""
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        return text[1:-1].replace('""', '"')
    return text.lower()


def redirect(sql: bytes, calls: Mapping[str, tuple[str, bytes | None]], call_count: int,
             views: Mapping[str, str] | None = None,
             aliased: Sequence[bool] = ()) -> tuple[bytes, ...] | None:
    """Rewrite calls of the functions named in ``calls`` (lower-case name -> (qualified
    replacement, a hole passed as its first argument or None)) and references to the views
    named in ``views`` (name -> a set-returning function given the STATEMENTS hole), each
    unqualified or qualified with pg_catalog.

    ``call_count``: how many such calls the parse tree has; ``aliased``: for each such view
    reference in text order, whether it has an alias (else the function gets the view's
    name as its alias, so column references keep working).
    Returns: the new text as parts: text, hole, text, hole, ..., text (one part when it has
    no hole); None when the tokens do not match the tree (then refuse).
    """
    views = views or {}
    text = sql.decode("latin-1")
    try:
        tokens = scan(text)
    except ParseError:
        return None
    # (start, end, replacement, hole, replacement after the hole)
    spans: list[tuple[int, int, bytes, bytes | None, bytes]] = []
    found_calls = found_views = 0
    for i, token in enumerate(tokens):
        if token.name != "IDENT":
            continue
        name = _ident(text[token.start:token.end + 1])
        after = tokens[i + 1].name if i + 1 < len(tokens) else ""
        is_call = after == _OPEN
        if is_call and name in calls:
            start = _qualified_start(text, tokens, i)
            if start is None:
                continue  # another schema's function, or a three-part name: not ours
            found_calls += 1
            target, hole = calls[name]
            if hole is None:
                spans.append((start, token.end + 1, target.encode(), None, b""))
            else:  # the name and its "(": the hole is the first argument
                spans.append((start, tokens[i + 1].end + 1, target.encode() + b"(", hole,
                              b", "))
        elif not is_call and after != _DOT and name in views:  # (not "view.column")
            start = _qualified_start(text, tokens, i)
            if start is None:
                continue
            if found_views >= len(aliased):
                return None
            alias = b"" if aliased[found_views] else b" AS " + name.encode()
            found_views += 1
            spans.append((start, token.end + 1, views[name].encode() + b"(", STATEMENTS,
                          b")" + alias))
    if found_calls != call_count or found_views != len(aliased):
        return None
    parts: list[bytes] = []
    out = bytearray()
    last = 0
    for start, end, head, hole, tail in spans:
        out += sql[last:start]
        out += head
        if hole is not None:
            parts += (bytes(out), hole)
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


def render(parts: tuple[bytes, ...], fill: Mapping[bytes, bytes]) -> bytes:
    """Returns: ``redirect``'s parts with each hole filled from ``fill``."""
    out = bytearray(parts[0])
    for i in range(1, len(parts), 2):
        out += fill[parts[i]]
        out += parts[i + 1]
    return bytes(out)


def fill(parts: tuple[bytes, ...], stmts: PreparedStatements, client_pid: int,
         out: bytearray | None = None, name: bytes | None = None) -> bytes:
    """Returns: ``redirect``'s parts with the client's holes filled: its pid, and its
    statements when the text reads pgtenant.prepared_statements (``name``, the statement
    being parsed, is one of them). With ``out`` (an extended batch), every statement of the
    client is first made sure to be on the attached server (quiet Parses written to
    ``out``), so that each of them shows with the server's details."""
    values = {CLIENT_PID: b"%d" % client_pid}
    if STATEMENTS in parts:
        if out is not None:
            for mapped in list(stmts.client.values()):
                stmts.use(out, mapped)
        values[STATEMENTS] = client_statements(stmts.client, name)
    return render(parts, values)
