"""A segment: one request the backend closes with one ReadyForQuery, and what it owes.

Owns the reply bookkeeping of the link tracker (which replies of a segment are the client's,
the proxy's own, or answered by the proxy itself). No I/O.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .replay import Replay

__all__ = [
    "DROP",
    "FWD",
    "K_BIND",
    "K_CLOSE",
    "K_DESC_P",
    "K_DESC_S",
    "K_EXEC",
    "K_PARSE",
    "K_QUERY",
    "SYNTH",
    "TERMINAL_OF",
    "Segment",
]

# Extended-protocol reply bookkeeping (see Segment.expect): what each request sent to the
# server will be answered with, and what to do with that answer.
K_PARSE: Final = 0  # ParseComplete '1'
K_BIND: Final = 1  # BindComplete '2'
K_CLOSE: Final = 2  # CloseComplete '3'
K_DESC_S: Final = 3  # ParameterDescription 't', then RowDescription 'T' or NoData 'n'
K_DESC_P: Final = 4  # RowDescription 'T' or NoData 'n'
K_EXEC: Final = 5  # DataRow/copy... then CommandComplete 'C', EmptyQuery 'I', Suspended 's'
K_QUERY: Final = 6  # a Query inside an unsynced batch: its replies run up to the Z
FWD: Final = 0  # the client asked for it: forward
DROP: Final = 1  # the proxy asked for it: the client must not see it
SYNTH: Final = 2  # answered by the proxy itself (``data``), nothing comes from the server
# The reply that completes each kind of request ('t' comes before a statement's 'T'/'n').
TERMINAL_OF: Final = {K_PARSE: b"1", K_BIND: b"2", K_CLOSE: b"3", K_DESC_S: b"Tn",
                       K_DESC_P: b"Tn", K_EXEC: b"CIs", K_QUERY: b""}

class Segment:
    """One request the server will close with one ReadyForQuery."""

    __slots__ = ("await_first", "drop", "expect", "extended", "failed", "heal", "hide_z",
                 "may_copy", "ours", "pins", "replay", "rollback", "sets", "shift", "split",
                 "synced", "t0", "txn_control", "unnamed_parse")

    def __init__(self, drop: int, shift: int = 0, await_first: bool = False):
        self.drop = drop  # leading injected replies still to drop
        self.shift = shift  # ErrorResponse position shift (simple-query prefix length)
        self.await_first = await_first  # injected Query: no client reply seen yet
        self.txn_control = False
        self.hide_z = False  # closed by a Sync the proxy inserted: its Z is not the client's
        self.ours = False  # a request of the proxy's own: no reply of it is the client's
        self.failed = False  # an ErrorResponse arrived for it
        self.split = False  # the first part of a client batch cut at a transaction end
        self.extended = False  # opened by an extended-protocol message
        self.synced = False  # an extended segment whose Sync was sent
        self.sets: tuple[tuple[str, str | None], ...] = ()  # plain SETs it makes (replayed)
        self.rollback = False  # its text may roll the transaction back
        self.pins = False  # it may create session state the client relies on (LISTEN...)
        self.may_copy = False  # it may start a COPY FROM STDIN: later requests wait for it
        self.unnamed_parse = False  # it parses the client's unnamed statement
        # Extended segments: [kind, action, data] per request, in reply order (data: the
        # global statement name of a Parse, or the bytes of a SYNTH reply).
        self.expect: deque[list[object]] | None = None
        # A batch that may be re-sent once if its prepared statement's plan changed
        # (see replay.py), and whether that is happening: its error and Z are hidden.
        self.replay: Replay | None = None
        self.heal = False
        self.t0 = 0.0  # when it was sent (for pgtenant_query_duration_seconds)
