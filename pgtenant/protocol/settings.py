"""Session settings: the client's SETs replayed with each context, encodings, session state.

Owns the client's own settings (startup parameters and plain SETs, replayed inside every
transaction's injected context), the client's and the attached server session's
client_encoding, whether the server must be emptied before this client's first request (a
tenant change), and whether the server's session holds state that keeps it from the pool
(``session_dirty``), to this client (``pinned``) or that must be emptied before the pool
gets it back (``temp_made``: temporary objects the server reported). It does not own
statements (prepared.py) nor framing (frontend.py, backend.py). No I/O.

Theory of operation
-------------------
Transaction mode gives a client a different server per transaction, so session settings
cannot stay on a server. A plain ``SET`` (or ``RESET``) the proxy can read is noted on its
segment (``Segment.sets``); at each ReadyForQuery the sets that took effect join the open
transaction's (``settle``), and when the transaction ends (status ``I``) without a rollback
they become part of the injection, which re-applies them with ``SET LOCAL`` in every later
transaction, on whichever server. Anything else that leaves session state pins the server.

client_encoding is the server session's, not replayed per transaction: Postgres decodes a
message with the encoding in force when it arrives, so a change must come before the client's
text, in a hidden Query of its own (``encoding_switch``). Both encodings are canonical names,
as Postgres reports them; both follow the ParameterStatus of the client's own statements
(SET, RESET, rollback, set_config alike).

Invariants: the statement guard reads SQL the way Postgres lexes it only with
standard_conforming_strings on and a safe client_encoding; a ParameterStatus saying otherwise
ends the link (``reported``), whatever path made the change. ParameterStatus for search_path
and for the settings the proxy manages is hidden: they reflect the injected context.
"""

from __future__ import annotations

from typing import Final

from ..errors import ServerProtocolError
from . import codec
from .constants import TXN_FAILED, TXN_IDLE
from .encoding import UNSAFE as _UNSAFE_ENCODINGS
from .encoding import encoding_key
from .inject import Injection
from .ledger import Segment
from .sql import plain_sets

__all__ = ["HIDDEN_PARAMETERS", "SessionSettings"]

# ParameterStatus names the client must not see change: they reflect the injected context.
HIDDEN_PARAMETERS: Final = frozenset({"search_path"})


class SessionSettings:
    """The client's session settings and the attached server session's state."""

    __slots__ = ("_startup_settings", "_txn_rolled_back", "_txn_sets", "encoding",
                 "injection", "managed", "pinned", "reset_encoding", "reset_pending",
                 "server_encoding", "session_dirty", "temp_made")

    def __init__(self, injection: Injection, client_encoding: str):
        self.injection = injection  # the context, with the client's settings, to inject
        self.encoding = client_encoding  # the client's
        self.server_encoding = "UTF8"  # the attached server session's
        # The client's own settings (startup parameters, plain SETs): re-applied with every
        # transaction's context; the servers' reports of them are the proxy's business.
        self.managed = injection.managed
        self._startup_settings = injection.settings
        self._txn_sets: list[tuple[str, str | None]] = []  # SETs inside an open block
        self._txn_rolled_back = False
        self.session_dirty = False  # a segment may have left session state: close, not pool
        self.pinned = False  # session state the client relies on: keep the server attached
        self.reset_pending = False  # DISCARD ALL before the next request (tenant change)
        self.reset_encoding = "UTF8"  # the attached server's client_encoding after a reset
        # The server reported a temporary object created in its session (backend.py): its
        # temp schema is emptied (DISCARD TEMP) before the server serves anyone else.
        self.temp_made = False

    def attach(self, server_encoding: str, reset: bool, reset_encoding: str) -> None:
        """A server was attached; ``reset``: it last served another tenant."""
        self.server_encoding = server_encoding
        self.reset_pending = reset
        self.reset_encoding = reset_encoding
        self.session_dirty = False
        self.pinned = False
        self.temp_made = False

    def encoding_switch(self) -> bytes:
        """Before a transaction's first message: give the server's session the client's
        encoding. Returns: the hidden Query doing it (its replies are the proxy's)."""
        self.server_encoding = self.encoding
        return codec.query(f"SET client_encoding TO '{self.encoding}'")

    def replayable_sets(self, sql: bytes) -> tuple[tuple[str, str | None], ...] | None:
        """The plain SETs of ``sql`` the proxy can replay, or None (then the server that
        runs it is pinned instead): the proxy reads text as UTF-8, so a non-ASCII value from
        a client in another encoding would be replayed garbled."""
        if self.encoding not in ("UTF8", "SQL_ASCII") and not sql.isascii():
            return None
        return plain_sets(sql)

    def settle(self, seg: Segment, status: int) -> None:
        """At a ReadyForQuery: keep the plain SETs that took effect, as Postgres would, and
        pin the server when session state was made (a failed attempt pins nothing)."""
        if seg.pins and not seg.failed:
            self.pinned = True
        if seg.sets and not seg.failed:
            self._txn_sets.extend(seg.sets)
        if seg.rollback or status == TXN_FAILED:
            self._txn_rolled_back = True
        if status != TXN_IDLE:
            return
        sets, rolled_back = self._txn_sets, self._txn_rolled_back
        self._txn_sets, self._txn_rolled_back = [], False
        if not sets or rolled_back:
            return
        current = {name.lower(): (name, value) for name, value in self.injection.settings}
        for name, value in sets:
            if name.lower() == "client_encoding":
                continue  # session state of the server, followed through ParameterStatus
            if value is None:
                current.pop(name.lower(), None)
            else:
                current[name.lower()] = (name, value)
        self.injection = self.injection.with_settings(tuple(current.values()))
        self.managed = self.injection.managed

    def discard_all(self) -> None:
        """The client's DISCARD ALL: back to the settings it logged in with."""
        self.injection = self.injection.with_settings(self._startup_settings)
        self.managed = self.injection.managed

    def reported(self, name: str, value: str, head: Segment | None) -> bool:
        """The server reported ParameterStatus ``name`` = ``value`` while ``head`` runs.

        Returns: whether the client sees it.
        Raises: ServerProtocolError when the guard could no longer read the client's SQL.
        """
        lname = name.lower()
        # The statement guard reads SQL the way Postgres lexes it only with these: a
        # change made by any path the guard did not see must end this link, before any
        # text lexed the other way is judged (the server's word over the model's).
        if lname == "standard_conforming_strings" and value.lower() != "on":
            raise ServerProtocolError("the server reported standard_conforming_strings "
                                      "off, which the statement guard cannot read")
        if lname == "client_encoding" and encoding_key(value) in _UNSAFE_ENCODINGS:
            raise ServerProtocolError(f"the server reported client_encoding {value!r}, "
                                      "which the statement guard cannot read")
        if head is not None and head.ours:
            return False  # the proxy's own reset or encoding switch
        if name in HIDDEN_PARAMETERS:
            return False
        if name == "client_encoding":
            self.encoding = self.server_encoding = value
            return True
        if lname in self.managed and not (
            head is not None and any(n.lower() == lname for n, _ in head.sets)
        ):
            return False  # the injected value coming or going: the client knows its own
        return True
