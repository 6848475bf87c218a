"""Refusals the statement guard decides, rewritten so that Postgres itself raises them.

Owns the SQL that replaces a refused Query or Parse (``CALL pgtenant.refuse(...)``) and the
proxy's reserved statement names. No I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, TypeAlias

from ..errors import ClientProtocolError

__all__ = [
    "FUNCTION_CALL_REFUSAL",
    "RESERVED_PREFIX",
    "RefusalText",
    "StatementPolicy",
    "Verdict",
    "check_statement_name",
    "refusal_sql",
    "refused_parse",
]

FUNCTION_CALL_REFUSAL: Final = (
    "pgtenant: the FunctionCall protocol message is not allowed in tenant sessions; call the "
    "function with SELECT instead"
)
# A statement policy's answer for one Query or Parse text (guard.py): None to run it as
# sent, bytes to run that text instead (a call redirected to a safe stand-in: redirect.py),
# a tuple of bytes to run those parts joined with the client's statements (a system view
# redirected to the client's own: redirect.render), a str to refuse it with that message.
Verdict: TypeAlias = str | bytes | tuple[bytes, ...] | None
StatementPolicy: TypeAlias = Callable[[bytes], Verdict]
_PARAM_REF = re.compile(rb"\$([0-9]+)")
RESERVED_PREFIX: Final = b"__pgtenant"


def check_statement_name(name: bytes) -> None:
    """Raises: ClientProtocolError for a statement name reserved for the proxy's own."""
    if name.startswith(RESERVED_PREFIX):
        raise ClientProtocolError(
            f"prepared statement name {name.decode(errors='replace')!r} is reserved: names "
            "starting with __pgtenant belong to the proxy"
        )


class RefusalText(str):
    """A refusal message with another SQLSTATE than 42501 (``refusal_sql`` raises it)."""

    sqlstate: str = "42501"

    def __new__(cls, message: str, sqlstate: str) -> RefusalText:
        text = super().__new__(cls, message)
        text.sqlstate = sqlstate
        return text


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''").replace("\x00", "") + "'"


def refusal_sql(message: str) -> bytes:
    """Returns: SQL that makes Postgres raise ``message`` with SQLSTATE 42501 (or the one a
    ``RefusalText`` carries).

    ``pgtenant.refuse``/``refuse_with`` are installed by ``pgtenant init``; were one
    missing, the statement still fails (undefined procedure), so the refused statement
    never runs either way.
    """
    code = getattr(message, "sqlstate", "42501")
    if code != "42501":
        return (b"CALL pgtenant.refuse_with(" + _literal(code).encode() + b", "
                + _literal(message).encode() + b")")
    return b"CALL pgtenant.refuse(" + _literal(message).encode() + b")"


def refused_parse(message: str, sql: bytes, param_types: bytes) -> tuple[bytes, bytes]:
    """Returns: (statement text, parameter types) that raise ``message`` when executed.

    It keeps the client's parameter count and declared types, so its Bind/Describe/Execute
    go through unchanged and the error arrives at Execute, in order.
    """
    count = int.from_bytes(param_types[:2], "big") if len(param_types) >= 2 else 0
    count = max([count, *(int(m) for m in _PARAM_REF.findall(sql) if len(m) < 6)])
    # pg_catalog.text: a tenant's temporary type named text would shadow a bare "text".
    spread = b"".join(b", $%d::pg_catalog.text" % i for i in range(1, count + 1))
    text = refusal_sql(message)[:-1] + spread + b")"
    types = param_types if len(param_types) >= 2 else b"\x00\x00"
    return text, types
