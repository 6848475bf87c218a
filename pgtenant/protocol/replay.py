"""Re-sending a batch once when its prepared statement's plan changed under it.

After DDL, Postgres refuses to Bind a prepared statement whose result columns changed
("cached plan must not change result type", SQLSTATE 0A000). Postgres hands that error to
the client; pgtenant heals it instead (issue #4) when that is provably harmless:

- the failing Bind is the first client message of a batch that started outside any
  transaction, so the error aborted only the proxy's own context and nothing the client did;
- the batch is complete (its Sync was sent) and nothing else was pipelined behind it;
- every Execute in it follows a Describe of its portal, so the client learns the new row
  shape from the retried batch (libpq's PQexecPrepared, psycopg, pgbench -M prepared).
  A client that executes without describing (asyncpg, pgjdbc) decodes rows with the
  description it cached: healing silently would feed it rows of another shape, so it gets
  the error, and those drivers re-prepare by themselves;
- the batch holds no Parse, Query, FunctionCall or Close of a statement, which would answer
  or change something twice; it fits in ``LIMIT`` bytes.

The tracker then hides the error and its ReadyForQuery, marks the statement stale (so it is
closed and parsed again) and feeds the recorded bytes through itself once more. No I/O here.
"""

from __future__ import annotations

from typing import Final

from . import codec
from .constants import BIND, CLOSE, DESCRIBE, EXECUTE, FLUSH, SYNC, TARGET_PORTAL
from .replies import Expected

__all__ = ["Replay"]

LIMIT: Final = 64 * 1024  # bytes of client batch kept for a retry; larger ones are not healed



class Replay:
    """The client bytes of one candidate batch, recorded as they are forwarded."""

    __slots__ = ("complete", "data", "described", "entry")

    def __init__(self, entry: Expected, bind: bytes | bytearray):
        # The reply-queue entry of the opening Bind: only its error is healed.
        self.entry = entry
        self.data = bytearray(bind)
        self.described: set[bytes] = set()  # portals described since their latest Bind
        self.complete = False  # the batch's Sync was recorded

    def note(self, t: int, frame: bytes | bytearray) -> bool:
        """Record one more client message of the batch.

        Returns: False when the batch can no longer be healed (drop this recorder then).
        """
        if self.complete or len(self.data) + len(frame) > LIMIT:
            return False
        if t == BIND:
            portal, _ = codec.read_cstring(frame, 5, limit=len(frame))
            self.described.discard(portal)
        elif t == DESCRIBE:
            if len(frame) > 5 and frame[5] == TARGET_PORTAL:
                portal, _ = codec.read_cstring(frame, 6, limit=len(frame))
                self.described.add(portal)
        elif t == EXECUTE:
            portal, _ = codec.read_cstring(frame, 5, limit=len(frame))
            if portal not in self.described:
                return False  # the client reads these rows with a description it cached
        elif t == CLOSE:
            if len(frame) <= 5 or frame[5] != TARGET_PORTAL:
                return False  # closing a statement: the retry would Bind a forgotten name
        elif t == SYNC:
            self.complete = True
        elif t != FLUSH:
            return False  # Parse, Query, FunctionCall: answered or run once already
        self.data += frame
        return True
