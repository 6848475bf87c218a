"""Prepared statements: the client's names, the proxy-global ones, and each server's LRU.

Owns which statements the client has (by its names), which global statements the attached
server holds (its LRU, handed over by the server at ``attach``), the client's unnamed
statement, what each named statement and portal may do (classify() flags), and the state of
the proxy's own context statement on the server. It does not own the framing of the client's
messages (frontend.py) nor the replies (backend.py); it writes the frames it needs into the
caller's output and records the replies they earn in the ledger. No I/O.

Theory of operation
-------------------
Named prepared statements (issue #4): a client's ``Parse "s1"`` is renamed to a proxy-global
name, a keyed hash of (text, parameter types, search_path), and prepared lazily on each
server. A server's LRU (``server``: name -> the generation it was prepared at there, see
freshness.py; False when stale: it may or may not exist, so Close first) is capped at
``max_prepared``; evicting sends a Close whose CloseComplete is the proxy's (DROP). A Parse of
a statement already on the server, and fresh, is answered by the proxy (SYNTH ParseComplete);
a Bind or Describe of one that is not there (an earlier transaction ran on another server, or
it was evicted) or is not fresh first re-prepares it quietly.

Fresh (freshness.py): a client's Parse takes no copy made before the last invalidation of
its global name, which comes when a client deallocated or closed the statement (it expects
its next Parse to be a real one: psycopg DEALLOCATEs ALL after DDL and ROLLBACK), when the
server failed a Bind of it (a parameter type dropped, a result type changed), and for every
name when DDL ran through the proxy; its later Binds, on any server, take no copy older than
that Parse asked for (``_required``). DEALLOCATE of a renamed statement is answered by the proxy
(local.py) as a simple Query or a lone batch; inside any other extended batch its text is
rewritten to name the global statement (``dealloc_text``), which the Bind then makes sure
exists (``bind_dealloc``).

The client's unnamed statement outlives Sync in Postgres, but a later transaction may land on
another server (or after a Query, which destroys it): it is re-parsed quietly before the
Bind that needs it (``ensure_unnamed``), and an unnamed statement the attached server got from
a previous client is closed before the client could use it.

Invariants: the global names are unguessable outside this process, so no tenant can name
another's statement even through SQL the guard cannot see; a statement the server may have
lost (a failed or skipped Parse, DEALLOCATE) is marked stale and re-established (Close, then
Parse) before it is relied on; the proxy's context statement likewise (``ctx_state``).
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict, deque
from typing import Final

from . import codec
from .constants import CLOSE, PARSE, PARSE_COMPLETE, TARGET_STATEMENT, TXN_IDLE
from .freshness import FRESHNESS, Freshness
from .inject import CLOSE_UNNAMED_STATEMENT, CTX_CLOSE, CTX_PARSE
from .ledger import Ledger, Segment
from .replies import (
    BIND_DROP,
    CLOSE_DROP,
    EXEC_DROP,
    PARSE_DROP,
    Expected,
    ReplyAction,
    ReplyKind,
)
from .sql import DDL, DROPS_STATEMENTS, TXN_CONTROL, local_command

__all__ = ["CTX_NONE", "CTX_READY", "CTX_UNKNOWN", "UNKNOWN_TXN", "PreparedStatements"]

# State of the proxy's context statement on the attached server.
CTX_NONE: Final = 0  # never parsed on this server
CTX_READY: Final = 1  # parsed and believed alive
CTX_UNKNOWN: Final = 2  # may have been deallocated: Close + Parse before use

_STMT_PREFIX: Final = b"__pgtenant_p"
# Global statement names are a keyed hash of what they hold: stable within this process (so
# servers share them), unguessable outside it, so no tenant can name another's statement
# even through SQL the guard cannot see (the guard also refuses SQL naming __pgtenant*).
_NAME_KEY: Final = secrets.token_bytes(16)
# A statement or portal name we never saw parsed/bound is one made by SQL (PREPARE, DECLARE):
# those hold only SELECT/DML, which cannot move the transaction status; or it does not exist
# and its Execute fails. Not knowing is still treated as "may": the next request waits.
UNKNOWN_TXN: Final = TXN_CONTROL
_PARSE_COMPLETE: Final = codec.frame(PARSE_COMPLETE, b"")
_CLOSE_STATEMENT: Final = bytes((TARGET_STATEMENT,))
_PARSE_SYNTH: Final = Expected(ReplyKind.PARSE, ReplyAction.SYNTH, _PARSE_COMPLETE)
# The extended-protocol injection's replies once the context statement is ready:
# Bind, Execute, Close of the unnamed portal, all the proxy's own.
_INJECTED: Final = (BIND_DROP, EXEC_DROP, CLOSE_DROP)
# The Bind errors of a renamed statement that say its copy is stale: XX000 "cache lookup
# failed for type", 0A000 "cached plan must not change result type", class 42 errors of the
# re-analysis (a datatype mismatch, a column gone). Others (a bad parameter value) say
# nothing about the statement.
_STALE_CLASSES: Final = (b"XX", b"0A", b"42")
# A client's statement that is an SQL DEALLOCATE [ALL] or DISCARD ALL (by statement name):
# ("name", the client's name it drops, its _Mapped), ("all", b"", None) or
# ("discard", b"", None).
_Mapped = tuple[bytes, bytes, bytes]  # a client's named statement: (global name, text, types)
_Dealloc = tuple[str, bytes, _Mapped | None]


class PreparedStatements:
    """The client's prepared statements and portals, and the attached server's."""

    __slots__ = ("_fresh", "_global_names", "_ledger", "_required", "_search_path",
                 "catalog_txn", "client", "ctx_state", "deallocs", "drops_statements",
                 "max_prepared", "portal_flags", "quiet_parses", "scrub_unnamed", "server",
                 "stmt_flags", "stmt_sets", "unnamed", "unnamed_here", "unnamed_seg")

    def __init__(self, ledger: Ledger, max_prepared: int, search_path: bytes,
                 freshness: Freshness = FRESHNESS):
        self._ledger = ledger
        self._fresh = freshness
        self._search_path = search_path  # keys the global names: schemas never share a plan
        self.max_prepared = max_prepared
        # The attached server's LRU: the generation each was prepared at, False when stale
        # (see ServerConnection.prepared and freshness.py).
        self.server: OrderedDict[bytes, int] = OrderedDict()
        self.client: dict[bytes, _Mapped] = {}  # name -> (G, sql, types)
        # The oldest stamp a server's copy of a global statement the client parsed may have:
        # freshness.py ``required`` at its latest Parse of it.
        self._required: dict[bytes, int] = {}
        self._global_names: dict[tuple[bytes, bytes], bytes] = {}
        # The client's unnamed statement (see the module docstring).
        self.unnamed: tuple[bytes, bytes] | None = None  # (text, types) of the last Parse ""
        self.unnamed_here = False  # that Parse is the attached server's unnamed statement
        self.unnamed_seg: Segment | None = None  # the segment that sent that Parse
        self.scrub_unnamed = False  # the server's unnamed statement may be another client's
        self.quiet_parses = 0  # Parses of the client's unnamed statement sent again quietly
        # What the client's statements and portals may do, by name: classify() flags of a
        # statement, TXN_CONTROL | TXN_END | MAY_COPY_IN of a portal, and a statement's SETs.
        self.stmt_flags: dict[bytes, int] = {}
        self.stmt_sets: dict[bytes, tuple[tuple[str, str | None], ...]] = {}
        self.portal_flags: dict[bytes, int] = {}
        # The client's statements that are SQL DEALLOCATE/DISCARD (extended protocol).
        self.deallocs: dict[bytes, _Dealloc] = {}
        self.ctx_state = CTX_NONE
        self.drops_statements = False  # a segment may have deallocated our statement
        self.catalog_txn = False  # the open transaction block may have changed the catalog

    # ------------------------------------------------------------------ attachment

    def attach(self, server: OrderedDict[bytes, int] | None, ctx_state: int) -> None:
        """A server was attached, with its LRU and its context-statement state."""
        self.server = server if server is not None else OrderedDict()
        self.ctx_state = ctx_state
        self.drops_statements = False
        self.scrub_unnamed = True
        self.unnamed_here = False

    def detach(self) -> int:
        """The server goes away. Returns: its context-statement state."""
        state = CTX_UNKNOWN if self.drops_statements and self.ctx_state else self.ctx_state
        self.ctx_state = CTX_NONE
        if self.catalog_txn:  # left mid-transaction: rolled back, what it created is gone
            self.catalog_txn = False
            self._fresh.invalidate_all()
        return state

    def server_reset(self) -> None:
        """What DISCARD ALL (and the Query carrying it) removed from the server session."""
        self.server.clear()
        self.ctx_state = CTX_NONE
        self.unnamed_here = False
        self.scrub_unnamed = False

    # ------------------------------------------------------------------ the proxy's own

    def ext_injection(self, out: bytearray, ext_bind: bytes, tail: bytes) -> Segment:
        """The extended-protocol context injection: (re-)Parse the context statement when it
        is not known to be on the server, then ``ext_bind`` + ``tail`` (Execute, Close).

        Returns: the new segment, owing the injection's replies (all DROP).
        """
        seg = Segment(0)
        if self.ctx_state != CTX_READY:
            if self.ctx_state == CTX_UNKNOWN:
                out += CTX_CLOSE
                out += CTX_PARSE
                seg.expect = deque((CLOSE_DROP, PARSE_DROP))
            else:
                out += CTX_PARSE
                seg.expect = deque((PARSE_DROP,))
            seg.expect.extend(_INJECTED)
            self.ctx_state = CTX_READY
        else:
            seg.expect = deque(_INJECTED)
        out += ext_bind
        out += tail
        return seg

    # ------------------------------------------------------------------ renamed statements

    def global_name(self, sql: bytes, types: bytes) -> bytes:
        """Returns: the proxy-global name of a statement of ``sql`` with ``types``."""
        name = self._global_names.get((sql, types))
        if name is None:
            # Keyed by search_path too: tenants on different schemas never share a plan.
            digest = hashlib.blake2b(sql + b"\x00" + types + b"\x00" + self._search_path,
                                     key=_NAME_KEY, digest_size=12).hexdigest()
            name = _STMT_PREFIX + digest.encode()
            if len(self._global_names) > 10_000:
                self._global_names.clear()
            self._global_names[(sql, types)] = name
        return name

    def parse_named(self, out: bytearray, name: bytes, text: bytes, types: bytes) -> bytes:
        """The client parses statement ``name``: renamed to a proxy-global statement,
        prepared on this server only when it is not there already (then ParseComplete is
        ours to send).

        Returns: bytes for the client now (a ParseComplete whose turn has come).
        """
        global_name = self.global_name(text, types)
        required = self._fresh.required(global_name)
        self.client[name] = (global_name, text, types)
        self._required[global_name] = required
        if len(self._required) > 2 * len(self.client) + 64:  # names closed since: forget
            self._required = {g: self._required.get(g, 1) for g, _, _ in self.client.values()}
        if self._ready(global_name, required):
            self.server.move_to_end(global_name)
            return self._ledger.expect(_PARSE_SYNTH)
        self._prepare(out, global_name, text, types, ReplyAction.FWD)
        return b""

    def _ready(self, name: bytes, required: int) -> bool:
        """Returns: whether global statement ``name`` is on the attached server, prepared
        at generation ``required`` or later (freshness.py)."""
        stamp = self.server.get(name)
        return stamp is not None and stamp >= required

    def _prepare(self, out: bytearray, name: bytes, sql: bytes, types: bytes,
                 action: ReplyAction) -> None:
        """Parse global statement ``name`` on the attached server (evicting LRU-wise)."""
        expect = self._ledger.expect
        server = self.server
        if name in server:  # stale, and may still exist: Close (never fails) first
            out += codec.frame(CLOSE, _CLOSE_STATEMENT + name + b"\x00")
            expect(CLOSE_DROP)
        out += codec.frame(PARSE, name + b"\x00" + sql + b"\x00" + types)
        expect(Expected(ReplyKind.PARSE, action, name))
        server[name] = self._fresh.generation
        server.move_to_end(name)
        while len(server) > self.max_prepared:
            old, _ = server.popitem(last=False)
            out += codec.frame(CLOSE, _CLOSE_STATEMENT + old + b"\x00")
            expect(CLOSE_DROP)

    def use(self, out: bytearray, mapped: _Mapped) -> bytes:
        """Make sure a client's renamed statement exists on the attached server, as fresh as
        it was when the client parsed it.

        Returns: its global name.
        """
        global_name, text, types = mapped
        if self._ready(global_name, self._required.get(global_name, 1)):
            self.server.move_to_end(global_name)
        else:  # parsed on another server, or evicted here: prepare it again, quietly
            self._prepare(out, global_name, text, types, ReplyAction.DROP)
        return global_name

    def note_statement(self, name: bytes, flags: int,
                       sets: tuple[tuple[str, str | None], ...]) -> None:
        """What statement ``name`` does, noted at its Parse and applied at each Bind: a named
        statement may run again in later transactions, on other servers."""
        self.stmt_flags[name] = flags
        self.stmt_sets[name] = sets

    def close(self, name: bytes) -> None:
        """The client closes statement ``name``: only the client's name goes away; the
        global statement stays on the server for others, but its copies made so far are no
        longer fresh: the client's next Parse of the text must be a real one (freshness.py).
        """
        self.stmt_flags.pop(name, None)
        self.stmt_sets.pop(name, None)
        self.deallocs.pop(name, None)
        mapped = self.client.pop(name, None)
        if mapped is not None:
            self._fresh.invalidate(mapped[0])

    def deallocate(self, name: bytes) -> bool:
        """DEALLOCATE ``name`` of the client's view. Returns: False for a name not renamed
        by the proxy (an SQL PREPAREd one, or an unknown one: Postgres answers)."""
        if name not in self.client:
            return False
        self.close(name)
        return True

    def forget_all(self, *, portals: bool) -> None:
        """DEALLOCATE ALL (``portals`` False) or DISCARD ALL of the client's own view."""
        for global_name, _, _ in self.client.values():
            self._fresh.invalidate(global_name)
        self.client.clear()
        self.deallocs.clear()
        if portals:
            self.portal_flags.clear()

    def bind_failed(self, name: bytes, code: bytes) -> None:
        """The server failed a Bind of global statement ``name`` with SQLSTATE ``code``.
        When the error says the statement went stale, its copy here is stale, and every
        copy made so far too (the client will parse it again and must get a fresh one)."""
        if code[:2] not in _STALE_CLASSES:
            return
        if name in self.server:
            self.server[name] = False
        self._fresh.invalidate(name)

    def catalog_sent(self, seg: Segment, flags: int) -> None:
        """A request with classify() ``flags`` goes in ``seg``. When it may change the
        catalog (sql.DDL), what the client parses after it (even in the same batch)
        must be parsed for real; its ReadyForQuery invalidates again (``catalog_settled``).
        """
        if flags & DDL:
            seg.catalog = True
            self._fresh.invalidate_all()

    def catalog_settled(self, changed: bool, status: int) -> None:
        """A ReadyForQuery (``status``) for a segment that may have changed the catalog
        (``changed``), or in a transaction block that may have: every statement copy made
        before is stale (freshness.py), once when the DDL ran (this session's later Parses
        must see it) and again when its block ends (a commit shows it to every server, a
        rollback takes back what it created)."""
        if changed or status == TXN_IDLE:
            self._fresh.invalidate_all()
        self.catalog_txn = status != TXN_IDLE

    # ------------------------------------------------------------------ SQL DEALLOCATE

    def dealloc_text(self, name: bytes, sql: bytes, text: bytes,
                     flags: int) -> tuple[bytes, int]:
        """The client parses statement ``name`` (b"": unnamed) with text ``sql``. An SQL
        DEALLOCATE of a renamed statement cannot reach Postgres as it is (the server knows
        only the global name): it is rewritten to drop the global statement, which its Bind
        first makes sure exists (``bind_dealloc``); DEALLOCATE ALL and DISCARD ALL go as
        they are and clear the client's view at their Bind.

        ``text``: what is parsed so far (``sql`` or the guard's refusal); ``flags``:
        classify(sql). Returns: the text to parse and the statement's flags (a rewritten one
        drops exactly the global statement, not every statement: no DROPS_STATEMENTS).
        """
        if self.deallocs:
            self.deallocs.pop(name, None)  # a statement of that name is replaced
        command = local_command(sql) if flags & DROPS_STATEMENTS else None
        if command is None:
            return text, flags
        kind, target = command
        if kind == "deallocate":
            client_name = (target or "").encode()
            mapped = self.client.get(client_name)
            if mapped is None:
                return text, flags  # an SQL PREPAREd name, or an unknown one: Postgres's
            self.deallocs[name] = ("name", client_name, mapped)
            return b"DEALLOCATE " + mapped[0], flags & ~DROPS_STATEMENTS
        self.deallocs[name] = ("all" if kind == "deallocate_all" else "discard", b"", None)
        return text, flags

    def before_bind(self, out: bytearray, stmt: bytes) -> None:
        """Before the client's Bind of statement ``stmt``: the unnamed statement is made
        the client's (``ensure_unnamed``), an SQL DEALLOCATE's target made to exist
        (``bind_dealloc``)."""
        if not stmt:
            self.ensure_unnamed(out)
        if self.deallocs:
            self.bind_dealloc(out, stmt)

    def bind_dealloc(self, out: bytearray, stmt: bytes) -> None:
        """Before the client's Bind of statement ``stmt`` when it is an SQL DEALLOCATE (see
        ``dealloc_text``): the global statement it drops is made to exist (a quiet Parse),
        and is stale from now on; the client's view forgets what it deallocates."""
        what = self.deallocs.get(stmt)
        if what is None:
            return
        kind, target, mapped = what
        if mapped is None:
            self.forget_all(portals=kind == "discard")
            return
        global_name = self.use(out, mapped)  # each time: the Execute must find it
        self.server[global_name] = False  # the Execute drops it (if it runs): Close first
        if self.client.get(target) == mapped:
            self.close(target)
        else:
            self._fresh.invalidate(global_name)

    def statements_dropped(self) -> None:
        """DEALLOCATE [ALL] may drop the proxy's statements too: which ones survive is
        guesswork. Shared servers are retired; a pinned one re-establishes them (Close
        first) before their next use."""
        self.drops_statements = True
        self.ctx_state = CTX_UNKNOWN
        server = self.server
        for name in server:
            server[name] = False

    # ------------------------------------------------------------------ the unnamed statement

    def parsed_unnamed(self, text: bytes, types: bytes, seg: Segment) -> None:
        """The client's Parse of the unnamed statement goes to the server in ``seg``."""
        self.unnamed = (text, types)
        self.unnamed_here = True
        self.unnamed_seg = seg
        seg.unnamed_parse = True

    def ensure_unnamed(self, out: bytearray) -> None:
        """Before a Bind/Describe of the unnamed statement: re-parse it quietly when the
        attached server's unnamed statement is not the client's, or close it when the client
        has none, so a previous client's is never used. Only here: a client that parses its
        own unnamed statement first (nearly all) replaces the server's and pays nothing."""
        pending = self._ledger.pending
        seg = pending[-1]
        if self.unnamed_here and (self.unnamed_seg is None or self.unnamed_seg is seg
                                  or self.unnamed_seg not in pending):
            return
        if self.unnamed is None:
            if self.scrub_unnamed:
                out += CLOSE_UNNAMED_STATEMENT
                self._ledger.expect(CLOSE_DROP)
                self.scrub_unnamed = False
            return
        # Not known to be there: never parsed on this server, destroyed since, or parsed in
        # an earlier batch still in flight whose Parse the server may skip after an error
        # (then the server keeps an older statement than the client's). Parse it again.
        text, types = self.unnamed
        out += codec.frame(PARSE, b"\x00" + text + b"\x00" + types)
        self._ledger.expect(PARSE_DROP)
        self.quiet_parses += 1
        self.unnamed_here = True
        self.unnamed_seg = seg
        seg.unnamed_parse = True

    # ------------------------------------------------------------------ errors

    def batch_failed(self, head: Segment) -> None:
        """An ErrorResponse for ``head``: Postgres now skips the batch up to its Sync, so
        what was not answered yet never ran. Statements whose Parse was skipped or failed
        are stale; the proxy's context statement too when a request of its own was pending.
        """
        if head.unnamed_parse:
            # That Parse may have been skipped: the server's unnamed statement is not
            # known to be the client's; parse it again before it is used.
            self.unnamed_here = False
        if head.expect is None:
            return
        server = self.server
        dropped = False
        for entry in head.expect:
            if entry.action == ReplyAction.DROP:
                dropped = True
            if (entry.kind == ReplyKind.PARSE and entry.data is not None
                    and entry.action != ReplyAction.SYNTH and entry.data in server):
                server[entry.data] = False  # may or may not exist now
        if dropped:
            # The injection failed or was skipped: its statement may be gone (a client's
            # DEALLOCATE, a failed Parse). Close and re-Parse next time.
            self.ctx_state = CTX_UNKNOWN
