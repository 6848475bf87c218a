"""Tenant-scoped LISTEN/NOTIFY: channel names private to a tenant, one client's listens.

Owns the mapping of a tenant's channel to the server channel private to that tenant
(``channel_name``; ``pgtenant.pg_notify`` in control/hardening.py computes the same in SQL),
the NotificationResponse bytes, and one client's LISTEN state (``Listens``): the channels it
listens to, the LISTEN/UNLISTEN/NOTIFY of its open transaction, and the notifications queued
for it until it is between transactions. It does not own the listener connection that hears
the server channels (notify.py) nor sockets. No I/O.

Theory of operation
-------------------
Notification channels are database-wide, so a tenant's ``LISTEN c`` never reaches a pooled
server: the proxy answers it (``answer``) and asks the database's listener connection to
LISTEN on ``channel_name(key, tenant, type, c)``, an HMAC under the database's signing key that
no other tenant can compute. ``NOTIFY c, 'p'`` is rewritten to ``NOTIFY "<mapped>", 'p'``
(``rewrite``) and runs in the client's own transaction, so Postgres keeps it transactional.

Postgres's rules, followed here: LISTEN/UNLISTEN inside a transaction block take effect at
COMMIT and are dropped on ROLLBACK (``_txn_ops``, applied by ``settle`` at the ReadyForQuery
'I' that ends the block); in a failed block the statement goes on to the server, which answers
"current transaction is aborted" (25P02) as Postgres would. A client's own NOTIFY reaches it
just before the ReadyForQuery of the committing transaction, with its own (proxy) backend pid,
as Postgres delivers self-notifications (psycopg relies on it); the listener's copy is then
skipped for that client (notify.py matches it by the pooled server's pid). Notifications from
the listener wait in ``queue`` while the client is inside a transaction or mid-reply, and go
out before its next ReadyForQuery 'I' (or at once when it is idle): never inside a reply.

Known differences from Postgres (docs: README "LISTEN/NOTIFY"): a transaction that had an
error, even one recovered with ROLLBACK TO SAVEPOINT, drops its LISTENs (the proxy cannot tell
a savepoint's rollback from the block's; the settings replay has the same rule); the queue of
one client is capped (``QUEUE_BYTES``), beyond it notifications are dropped and counted.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import TYPE_CHECKING, Any, Final, Protocol

from pglast.parser import ParseError

from . import codec
from .constants import NOTIFICATION_RESPONSE, TXN_FAILED, TXN_IDLE
from .sql import CLASSIFY_PARSE_MAX, NOTIFIES, classify, parse

if TYPE_CHECKING:
    from ..stats import NotifyStats
    from .ledger import Segment

__all__ = [
    "MAPPED_PREFIX",
    "QUEUE_BYTES",
    "Listens",
    "Registrar",
    "channel_name",
    "notification",
    "parse_notification",
]

MAPPED_PREFIX: Final = "pgtenant_"
_MAPPED_HEX: Final = 40  # 160 bits of HMAC: 9 + 40 = 49 bytes, under NAMEDATALEN (64)
# A client's queued notifications, in bytes, before new ones are dropped (counted, logged):
# a client that does not read must not grow the proxy without bound.
QUEUE_BYTES: Final = 1 << 20
# The encodings a channel or payload may be spelled in beyond ASCII: the proxy reads and
# writes them as UTF-8 (the listener's session is UTF-8 too).
_UTF8_LIKE: Final = frozenset({"UTF8", "SQL_ASCII"})
# What a LISTEN/UNLISTEN given to Parse becomes on the server: a statement with the same
# replies (ParseComplete, NoData, BindComplete, CommandComplete) that leaves no state (an
# UNLISTEN by a backend that never listened queues nothing); its tag says UNLISTEN.
_PLACEHOLDER: Final = b'UNLISTEN "pgtenant_noop"'
_MAX_STATEMENT_OPS: Final = 1000  # LISTEN statements kept per client (oldest forgotten)
_pack_i32 = struct.Struct("!i").pack
_unpack_i32 = struct.Struct("!i").unpack_from


def channel_name(key: bytes, tenant_id: str, tenant_type: str, channel: str) -> str:
    """Returns: the server channel of ``channel`` for one tenant: ``pgtenant_`` and the first
    40 hex digits of HMAC-SHA256(key, 'notify|' || tenant_id || '|' || tenant_type || '|' ||
    channel). ``pgtenant.pg_notify`` (control/hardening.py) computes exactly this in SQL.

    The 'notify|' tag keeps these messages apart from the context signature's
    (``org|type|entity``), so no channel name is ever a prefix of a context signature.
    """
    message = f"notify|{tenant_id}|{tenant_type}|{channel}".encode()
    digest = hmac.new(key, message, hashlib.sha256).hexdigest()
    return MAPPED_PREFIX + digest[:_MAPPED_HEX]


def notification(pid: int, channel: bytes, payload: bytes) -> bytes:
    """Returns: a NotificationResponse ('A') frame."""
    return codec.frame(NOTIFICATION_RESPONSE,
                       _pack_i32(pid) + channel + b"\x00" + payload + b"\x00")


def parse_notification(body: bytes) -> tuple[int, bytes, bytes]:
    """Returns: (pid, channel, payload) of a NotificationResponse body.
    Raises: ValueError when the body is malformed."""
    if len(body) < 6:
        raise ValueError("NotificationResponse too short")
    (pid,) = _unpack_i32(body, 0)
    end = body.find(b"\x00", 4)
    tail = body.find(b"\x00", end + 1) if end >= 0 else -1
    if end < 0 or tail != len(body) - 1:
        raise ValueError("malformed NotificationResponse")
    return pid, body[4:end], body[end + 1 : tail]


class Registrar(Protocol):
    """The database's listener, as one client's ``Listens`` uses it (session.py adapts
    notify.Notifier, adding the client and its attached server)."""

    def subscribe(self, mapped: str, channel: str) -> bool: ...  # True: heard from now on
    def unsubscribe(self, mapped: str) -> None: ...
    def notifying(self, mapped: str, payload: bytes) -> None: ...  # sent in this txn
    def not_notified(self, mapped: str, payload: bytes) -> None: ...  # ... rolled back
    # ... committed: True when the listener has yet to hear it (then the client's
    # ReadyForQuery waits for it: see ``settle``)
    def committed(self, mapped: str, payload: bytes) -> bool: ...


def _single(sql: bytes) -> dict[str, Any] | None:
    """Returns: the only statement of ``sql`` when it is a LISTEN, UNLISTEN or NOTIFY."""
    if len(sql) > CLASSIFY_PARSE_MAX:
        return None  # not one (a payload is at most 8000 bytes), and too big to parse here
    try:
        stmts = parse(sql).get("stmts", [])
    except (ParseError, ValueError, RecursionError):
        return None
    if len(stmts) != 1:
        return None
    stmt: dict[str, Any] = stmts[0].get("stmt", {})
    if "ListenStmt" in stmt or "UnlistenStmt" in stmt or "NotifyStmt" in stmt:
        return stmt
    return None


class Listens:
    """One client's LISTEN state; see the module docstring."""

    __slots__ = ("_key", "_rolled_back", "_tenant", "_txn_ops", "_txn_sent", "channels",
                 "deferred", "pid", "portal_ops", "queue", "queued_bytes", "registrar",
                 "stats", "stmt_ops", "waiting")

    def __init__(self, key: bytes, tenant_id: str, tenant_type: str, registrar: Registrar,
                 stats: NotifyStats | None = None):
        self._key = key
        self._tenant = (tenant_id, tenant_type)
        self.registrar = registrar
        self.stats = stats
        self.pid = 0  # the client's backend pid (its BackendKeyData), for its own notifies
        self.channels: dict[str, str] = {}  # the client's channel -> the server channel
        # LISTEN/UNLISTEN of the open transaction block: applied at COMMIT, dropped otherwise
        # (("listen", channel), ("unlisten", channel), ("unlisten", None) for UNLISTEN *).
        self._txn_ops: list[tuple[str, str | None]] = []
        # NOTIFYs of the open transaction, deduplicated as Postgres does (same channel and
        # payload: one notification): (server channel, payload) -> the client's channel.
        self._txn_sent: dict[tuple[str, bytes], str] = {}
        self._rolled_back = False
        # LISTEN/UNLISTEN through Parse: what each client statement and portal does when
        # executed (its text on the server is a no-op, ``_PLACEHOLDER``).
        self.stmt_ops: dict[bytes, tuple[str, str | None]] = {}
        self.portal_ops: dict[bytes, tuple[str, str | None]] = {}
        # NotificationResponses not yet sent: appended, then all sent at once, so a list (an
        # empty deque costs every idle client 600 bytes; issue 16).
        self.queue: list[bytes] = []
        self.queued_bytes = 0
        # The client's next reply waits for the listener (``deferred``): to hear a channel
        # it now listens to, or to hear the NOTIFY it committed (session.py resumes it).
        self.waiting = False
        self.deferred = b""

    def mapped(self, channel: str) -> str:
        """Returns: the server channel of this tenant's ``channel``."""
        return channel_name(self._key, *self._tenant, channel)

    # ------------------------------------------------------------------ client statements

    @staticmethod
    def is_listen(sql: bytes) -> bool:
        """Returns: whether ``sql`` is a lone LISTEN or UNLISTEN (``answer`` decides it once
        no reply is owed: the status that decides is known then)."""
        stmt = _single(sql)
        return stmt is not None and "NotifyStmt" not in stmt

    def answer(self, sql: bytes, status: int, encoding: str) -> bytes | None:
        """A Query text sent outside an extended batch, with no reply owed: answer it when
        it is a lone LISTEN or UNLISTEN.

        ``status`` is the transaction status the client is in (TXN_IDLE with no server).
        Returns: CommandComplete + ReadyForQuery to send (b"" when the answer waits for the
        listener: then ``waiting`` is set and ``deferred`` holds it), or None to let the
        statement go on (a NOTIFY, anything else, or a failed transaction block, where the
        server itself answers "current transaction is aborted").
        """
        stmt = _single(sql)
        if stmt is None or "NotifyStmt" in stmt:
            return None
        if status == TXN_FAILED:
            return None
        op = self._op(stmt)
        assert op is not None
        tag = op[0].upper()
        if op[1] is not None and not _spellable(op[1], encoding):
            return None  # the guard refuses it, naming what is supported
        reply = codec.command_complete(tag) + codec.ready_for_query(bytes((status,)))
        if status != TXN_IDLE:
            self._txn_ops.append(op)
            return reply
        if self._apply(op):
            return reply
        self.waiting = True
        self.deferred = reply
        return b""

    @staticmethod
    def _op(stmt: dict[str, Any]) -> tuple[str, str | None] | None:
        if "ListenStmt" in stmt:
            return ("listen", str(stmt["ListenStmt"].get("conditionname", "")))
        if "UnlistenStmt" in stmt:
            name = stmt["UnlistenStmt"].get("conditionname")
            return ("unlisten", None if name is None else str(name))
        return None

    def query(self, sql: bytes, flags: int, encoding: str) -> bytes:
        """A Query text (``flags``: its classify()) about to run. Returns: a lone NOTIFY
        rewritten (see ``rewrite``; its notification is tracked), else b""."""
        if not flags & NOTIFIES:
            return b""
        return self.rewrite(sql, encoding, record=True) or b""

    def parse(self, name: bytes, sql: bytes, encoding: str) -> bytes | None:
        """A Parse of statement ``name``. Returns: the text to parse instead: a lone NOTIFY
        rewritten (see ``rewrite``), or for a lone LISTEN/UNLISTEN a no-op whose execution
        the proxy turns into that LISTEN at the transaction's commit (``bind``,
        ``execute``); None to parse ``sql`` as it is."""
        if self.stmt_ops:
            self.stmt_ops.pop(name, None)
        if not classify(sql) & NOTIFIES:
            return None
        rewritten = self.rewrite(sql, encoding, record=False)
        if rewritten is not None:
            return rewritten
        stmt = _single(sql)
        op = self._op(stmt) if stmt is not None else None
        if op is None or (op[1] is not None and not _spellable(op[1], encoding)):
            return None
        if len(self.stmt_ops) >= _MAX_STATEMENT_OPS:
            self.stmt_ops.pop(next(iter(self.stmt_ops)))
        self.stmt_ops[name] = op
        return _PLACEHOLDER

    def bind(self, portal: bytes, stmt: bytes) -> None:
        """A Bind of ``stmt`` to ``portal``: the portal does what the statement does."""
        if not (self.stmt_ops or self.portal_ops):
            return  # the common case: no LISTEN was ever given to Parse
        op = self.stmt_ops.get(stmt)
        if op is not None:
            self.portal_ops[portal] = op
        else:
            self.portal_ops.pop(portal, None)

    def execute(self, portal: bytes) -> None:
        """An Execute of ``portal``: its LISTEN/UNLISTEN takes effect if the transaction
        commits (``settle``), exactly like one inside a transaction block."""
        op = self.portal_ops.get(portal)
        if op is not None:
            self._txn_ops.append(op)

    def rewrite(self, sql: bytes, encoding: str, *, record: bool) -> bytes | None:
        """Returns: a lone ``NOTIFY c[, 'p']`` rewritten to the tenant's server channel, or
        None when ``sql`` is not one (the guard then judges it). ``record``: the text runs
        now as a simple Query, so this transaction's own notification is tracked (a Parse
        may run later, or never: its notifications come through the listener only).
        """
        stmt = _single(sql)
        if stmt is None or "NotifyStmt" not in stmt:
            return None
        notify = stmt["NotifyStmt"]
        channel = str(notify.get("conditionname", ""))
        payload = str(notify.get("payload", ""))
        if not (_spellable(channel, encoding) and _spellable(payload, encoding)):
            return None
        mapped = self.mapped(channel)
        text = f'NOTIFY "{mapped}"'
        if payload:
            text += ", '" + payload.replace("'", "''") + "'"
        if record:
            key = (mapped, payload.encode())
            if key not in self._txn_sent:
                self._txn_sent[key] = channel
                self.registrar.notifying(*key)
        return text.encode()

    # ------------------------------------------------------------------ transaction ends

    def settle(self, seg: Segment, status: int) -> None:
        """At each ReadyForQuery: at the end of a transaction (status 'I'), apply its
        LISTEN/UNLISTEN and queue its own notifications when it committed, or drop them.
        Sets ``waiting`` when a channel it now listens to is not heard yet."""
        if seg.failed or seg.rollback or status == TXN_FAILED:
            self._rolled_back = True
        if status != TXN_IDLE or not (self._txn_ops or self._txn_sent or self._rolled_back):
            return
        ops, sent, rolled_back = self._txn_ops, self._txn_sent, self._rolled_back
        self._txn_ops, self._txn_sent, self._rolled_back = [], {}, False
        self.portal_ops.clear()  # portals end with the transaction
        if rolled_back:
            for mapped, payload in sent:
                self.registrar.not_notified(mapped, payload)
            return
        for op in ops:
            if not self._apply(op):
                # The ReadyForQuery that ends this transaction waits for the listener
                # (backend.py keeps it in ``deferred``), so a NOTIFY right after is heard.
                self.waiting = True
        for (mapped, payload), channel in sent.items():
            if self.channels.get(channel) == mapped:
                self.enqueue(notification(self.pid, channel.encode(), payload))
        if sent and self.registrar.committed(*next(reversed(sent))):
            # The ReadyForQuery of its COMMIT waits until the listener heard the last of
            # them (Postgres sends a transaction's notifications in order): when NOTIFY
            # returns, every listening client has been sent it (or has it queued).
            self.waiting = True

    def _apply(self, op: tuple[str, str | None]) -> bool:
        """Returns: whether the listener hears the channel already (a LISTEN's answer
        waits for it otherwise)."""
        verb, channel = op
        if verb == "listen":
            assert channel is not None
            if channel in self.channels:
                return True
            mapped = self.channels[channel] = self.mapped(channel)
            return self.registrar.subscribe(mapped, channel)
        names = list(self.channels) if channel is None else [channel]
        for name in names:
            mapped_name = self.channels.pop(name, None)
            if mapped_name is not None:
                self.registrar.unsubscribe(mapped_name)
        return True

    def close(self) -> None:
        """The client went away: every channel goes."""
        self._apply(("unlisten", None))
        self.queue.clear()
        self.queued_bytes = 0

    # ------------------------------------------------------------------ delivery

    def enqueue(self, frame: bytes) -> bool:
        """Keep a NotificationResponse until the client is between transactions.

        Returns: False when it was dropped (the queue is full: counted).
        """
        if self.queued_bytes + len(frame) > QUEUE_BYTES:
            if self.stats is not None:
                self.stats.dropped_queue_full += 1
            return False
        self.queue.append(frame)
        self.queued_bytes += len(frame)
        return True

    def flush(self) -> bytes:
        """Returns: every queued notification, now due (the queue is emptied)."""
        if self.stats is not None:
            self.stats.delivered += len(self.queue)
        out = b"".join(self.queue)
        self.queue.clear()
        self.queued_bytes = 0
        return out

    def confirmed(self) -> bytes:
        """The listener hears the channel of the LISTEN whose answer waited.
        Returns: that answer."""
        out, self.deferred, self.waiting = self.deferred, b"", False
        return out


def _spellable(text: str, encoding: str) -> bool:
    """Returns: whether the proxy can spell ``text`` in the client's encoding (it reads and
    writes UTF-8; other encodings are fine for ASCII)."""
    return encoding in _UTF8_LIKE or text.isascii()
