"""The bytes that open each transaction with a tenant's context (ARCHITECTURE.md §3).

Built once per authenticated client, so the per-transaction cost is a concatenation. The
simple-query form is a ``SET LOCAL`` prefix spliced into the client's own Query; the
extended form is a Bind/Execute of a proxy-owned statement whose values travel as
parameters (never visible in ``pg_stat_activity.query``). No I/O.
"""

from __future__ import annotations

from typing import Final

from ..identity.context import TenantContext, quote_ident, quote_literal
from . import codec

__all__ = [
    "CTX_CLOSE",
    "CTX_PARSE",
    "CTX_STATEMENT",
    "EXECUTE_UNNAMED",
    "EXT_DROP",
    "Q_DROP",
    "Injection",
]

# The proxy-owned prepared statement. The leading "__pgtenant" keeps it out of the way of
# client statement names; issue #4's renaming uses a different prefix.
CTX_STATEMENT: Final = "__pgtenant_ctx"
# set_config(..., true) is SET LOCAL: it lasts until the end of the (implicit or explicit)
# transaction, i.e. at least until the client's Sync. 'role' last, so the app.* settings are
# made by the login role, and the role switch is what the client's statements run under.
CTX_SQL: Final = (
    "SELECT set_config('app.tenant_id', $1, true), set_config('app.tenant_type', $2, true), "
    "set_config('app.entity_id', $3, true), set_config('search_path', $4, true), "
    "set_config('role', $5, true)"
)
_TEXT_OID: Final = 25
CTX_PARSE: Final = codec.parse(CTX_STATEMENT, CTX_SQL, (_TEXT_OID,) * 5)
# Close of a statement that does not exist is not an error, so Close+Parse re-establishes
# the statement when we cannot be sure it survived (DEALLOCATE ALL, DISCARD ALL, errors).
CTX_CLOSE: Final = codec.frame(ord("C"), b"S" + CTX_STATEMENT.encode() + b"\x00")
EXECUTE_UNNAMED: Final = codec.execute("", 0)

# Replies the server sends for the injected part, which the client must never see:
Q_DROP: Final = 5  # five CommandComplete "SET"
EXT_DROP: Final = 3  # BindComplete, DataRow, CommandComplete (+1 ParseComplete, +1 CloseComplete)


class Injection:
    """Precomputed injection bytes for one tenant context.

    Attributes:
        q_prefix: SQL text spliced in front of a simple Query's text (ASCII).
        q_shift: characters the prefix adds, to shift ErrorResponse positions back.
        ext_bind: the Bind of ``CTX_STATEMENT`` to the unnamed portal with this context.
    """

    __slots__ = ("context", "ext_bind", "q_prefix", "q_shift")

    def __init__(self, context: TenantContext):
        self.context = context
        parts = [f"SET LOCAL {name} = {quote_literal(value)}; " for name, value in context.gucs]
        parts.append(f"SET LOCAL search_path = {context.search_path_value}; ")
        parts.append(f"SET LOCAL ROLE {quote_ident(context.role)};")
        prefix = "".join(parts)
        self.q_prefix: bytes = prefix.encode("ascii")
        self.q_shift: int = len(prefix)
        values = [v for _, v in context.gucs]
        values += [context.search_path_value, context.role]
        self.ext_bind: bytes = codec.bind("", CTX_STATEMENT, [v.encode() for v in values])
