"""One reply owed: the request it answers (``ReplyKind``), whose it is (``ReplyAction``), and
the immutable ``Expected`` entry the ledger queues per request.

Split from ledger.py so that replay.py (which re-sends requests and needs their entries) and
the ledger (which holds a segment's replay) do not import each other. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from .constants import (
    BIND_COMPLETE,
    CLOSE_COMPLETE,
    COMMAND_COMPLETE,
    EMPTY_QUERY_RESPONSE,
    NO_DATA,
    PARSE_COMPLETE,
    PORTAL_SUSPENDED,
    ROW_DESCRIPTION,
)

__all__ = [
    "BIND_DROP", "BIND_FWD", "CLOSE_DROP", "CLOSE_FWD", "DESC_P_FWD", "DESC_S_FWD", "DROP",
    "EXEC_DROP", "EXEC_FWD", "FWD", "PARSE_DROP", "PARSE_FWD", "QUERY_FWD", "SYNTH",
    "TERMINAL_OF", "Expected", "ReplyAction", "ReplyKind", "expected",
]


class ReplyKind(IntEnum):
    """The request an extended-protocol reply answers (see ``TERMINAL_OF``)."""

    PARSE = 0  # ParseComplete '1'
    BIND = 1  # BindComplete '2'
    CLOSE = 2  # CloseComplete '3'
    DESCRIBE_STATEMENT = 3  # ParameterDescription 't', then RowDescription 'T' or NoData 'n'
    DESCRIBE_PORTAL = 4  # RowDescription 'T' or NoData 'n'
    EXECUTE = 5  # DataRow/copy... then CommandComplete 'C', EmptyQuery 'I', Suspended 's'
    QUERY = 6  # a Query inside an unsynced batch: its replies run up to the Z


class ReplyAction(IntEnum):
    """Whose reply it is, and so what becomes of it."""

    FWD = 0  # the client asked for it: forward
    DROP = 1  # the proxy asked for it: the client must not see it
    SYNTH = 2  # answered by the proxy itself (``data``), nothing comes from the server


FWD: Final = ReplyAction.FWD
DROP: Final = ReplyAction.DROP
SYNTH: Final = ReplyAction.SYNTH


# The reply that completes each kind of request ('t' comes before a statement's 'T'/'n'),
# indexed by ReplyKind. A Query's replies end only with its ReadyForQuery.
TERMINAL_OF: Final[tuple[frozenset[int], ...]] = (
    frozenset((PARSE_COMPLETE,)),
    frozenset((BIND_COMPLETE,)),
    frozenset((CLOSE_COMPLETE,)),
    frozenset((ROW_DESCRIPTION, NO_DATA)),
    frozenset((ROW_DESCRIPTION, NO_DATA)),
    frozenset((COMMAND_COMPLETE, EMPTY_QUERY_RESPONSE, PORTAL_SUSPENDED)),
    frozenset(),
)


@dataclass(frozen=True, slots=True)
class Expected:
    """One reply owed for one request of an extended segment.

    ``data``: the global statement name of a Parse or Bind of a renamed statement (an error
    then marks that statement stale), or the bytes of a SYNTH reply.
    """

    kind: ReplyKind
    action: ReplyAction
    data: bytes | None = None


# The slots' own setters: what the frozen dataclass's __init__ does through
# object.__setattr__, at half the cost (a Bind of a renamed statement makes one per request).
# Read through the class's own __new__ and vars() so that the same lines work compiled by
# mypyc, whose native class refuses object.__new__ and has getset descriptors, not slots.
_new_entry = Expected.__new__
_set_kind = vars(Expected)["kind"].__set__
_set_action = vars(Expected)["action"].__set__
_set_data = vars(Expected)["data"].__set__


def expected(kind: ReplyKind, action: ReplyAction, data: bytes | None) -> Expected:
    """Returns: a new ``Expected`` (the hot-path form of ``Expected(kind, action, data)``)."""
    entry = _new_entry(Expected)
    _set_kind(entry, kind)
    _set_action(entry, action)
    _set_data(entry, data)
    return entry


# The entries that carry no data, shared (an Expected is immutable): no allocation per request.
# Only a Bind of a renamed statement makes its own entry, whose identity replay.py relies on.
PARSE_FWD: Final = Expected(ReplyKind.PARSE, FWD)
PARSE_DROP: Final = Expected(ReplyKind.PARSE, DROP)
BIND_FWD: Final = Expected(ReplyKind.BIND, FWD)
BIND_DROP: Final = Expected(ReplyKind.BIND, DROP)
CLOSE_FWD: Final = Expected(ReplyKind.CLOSE, FWD)
CLOSE_DROP: Final = Expected(ReplyKind.CLOSE, DROP)
DESC_S_FWD: Final = Expected(ReplyKind.DESCRIBE_STATEMENT, FWD)
DESC_P_FWD: Final = Expected(ReplyKind.DESCRIBE_PORTAL, FWD)
EXEC_FWD: Final = Expected(ReplyKind.EXECUTE, FWD)
EXEC_DROP: Final = Expected(ReplyKind.EXECUTE, DROP)
QUERY_FWD: Final = Expected(ReplyKind.QUERY, FWD)
