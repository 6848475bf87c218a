"""Which server copies of the proxy-global statements may be stale, for the whole process.

Owns the generation counter and the global statement names invalidated since the process
started. It does not own the copies themselves (each server's LRU, prepared.py). No I/O.

Theory of operation
-------------------
A global statement (prepared.py) is shared by every client whose Parse has the same text,
parameter types and search_path, and its copies live on many servers. Postgres fixes a
statement's parameter types when it is parsed (an unknown ``$1`` cast to a type is resolved
to that type's OID) and cannot re-plan one whose result type changed. After DDL (a type
dropped and created again, a column's type altered, objects created in a transaction that
rolled back) such a copy fails at Bind ("cache lookup failed for type", "cached plan must
not change result type", a datatype mismatch) where a fresh Parse of the same text
succeeds. On a direct connection a client gets out of that by deallocating its statements
and parsing them again (psycopg DEALLOCATEs ALL after DROP, ALTER, ROLLBACK and DISCARD) or
by parsing again after the error. Through the proxy that next Parse would be answered with
the very copy the client meant to drop, on that server or on the next one.

So each copy is stamped with the generation it was prepared at (its value in the server's
LRU; 0/False: stale, may exist). A client's DEALLOCATE or Close of a statement, and a
server's error at the Bind of one, invalidate the global name; DDL a client ran through the
proxy (sql.DDL) invalidates every name. A client's Parse then asks for a copy at least
as new as the last invalidation (``required``), so it is a real one, as on a direct
connection, and the client's statement keeps that requirement on every server it is bound
on later. A copy older than that is re-established (Close, then Parse) before it is relied
on; an invalidation after the client's Parse does not touch its statement, which then
behaves as on a direct connection (Postgres re-plans it, or fails the Bind as it would; the
statement is invalidated and the client's next Parse is a real one).
"""

from __future__ import annotations

from typing import Final

__all__ = ["FRESHNESS", "Freshness"]

# Invalidated names remembered one by one; past this, every copy made so far is stale
# instead (forgetting a name would let a stale copy pass: fail closed, pay a re-Parse).
_MAX_NAMES: Final = 10_000


class Freshness:
    """The generation of prepared copies and the invalidated global names."""

    __slots__ = ("_floor", "_since", "generation")

    def __init__(self) -> None:
        self.generation = 1  # the stamp of a copy prepared now (True counts as 1)
        self._since: dict[bytes, int] = {}  # name -> copies stamped below are stale
        self._floor = 0  # every copy stamped below is stale

    def invalidate(self, name: bytes) -> None:
        """Every copy of global statement ``name`` prepared so far may be stale."""
        self.generation += 1
        if name not in self._since and len(self._since) >= _MAX_NAMES:
            self._since.clear()
            self._floor = self.generation
        else:
            self._since[name] = self.generation

    def invalidate_all(self) -> None:
        """Every copy of every global statement prepared so far may be stale (DDL)."""
        self.generation += 1
        self._floor = self.generation
        self._since.clear()  # all below the floor now

    def required(self, name: bytes) -> int:
        """Returns: the oldest stamp a copy of ``name`` parsed for a client now may have."""
        return max(1, self._floor, self._since.get(name, 0))


# One for the process: the global names and the servers' LRUs are shared process-wide too.
FRESHNESS: Final = Freshness()
