"""The admin console (issue #5): ``psql "dbname=pgtenant user=admin password=<admin token>"``.

PgBouncer's commands with PgBouncer's column names, so its tooling and habits carry over:
``SHOW POOLS | CLIENTS | SERVERS | STATS | DATABASES | CONFIG | VERSION | HELP``, plus
``SHOW TENANTS`` (per tenant: clients by state, transactions, wait time), ``SHOW LISTENERS``
(LISTEN/NOTIFY: each database's listener connection), ``PAUSE [db]``,
``RESUME [db]``, ``RELOAD``, ``KILL <tenant>`` and ``SHUTDOWN``. Simple query protocol only
(psql's); every command is logged with the admin's name and address.

This module reads the App's tables and formats rows; the actions themselves (pause, reload,
kill, shutdown) are the App's and the pools'.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from . import __version__, build_kind
from .config import Config
from .errors import ConfigError, ProxyError
from .protocol import codec
from .protocol.constants import ADMIN_DATABASE, QUERY, SYNC, TERMINATE
from .protocol.frames import ADMIN_LIMIT, HEADER_SIZE, FrameError, frame_at
from .server import ServerState
from .stats import Metrics

if TYPE_CHECKING:
    from .client import ClientConnection
    from .pool import Pool

__all__ = ["ADMIN_DATABASE", "AdminConsole", "AdminPeer", "AdminServices"]

log = logging.getLogger("pgtenant.admin")

_EXTENDED: Final = frozenset(b"PBDECHSdcfF")
_Z_IDLE: Final = codec.ready_for_query(b"I")

Column = tuple[str, bool]  # (name, is an integer)


class AdminPeer(Protocol):
    """The connection an admin console talks through."""

    user: str
    peer_host: str

    def write(self, data: bytes) -> None: ...
    def close(self, reason: str) -> None: ...


class AdminError(Exception):
    """A command that cannot be carried out: an ErrorResponse, the console goes on."""

    def __init__(self, message: str, sqlstate: str = "42601", hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.hint = hint


def _table(columns: Sequence[Column], rows: Iterable[Sequence[object]],
           tag: str = "SHOW") -> bytes:
    out = bytearray(codec.row_description(columns))
    for row in rows:
        out += codec.data_row(row)
    return bytes(out) + codec.command_complete(tag)


def _cols(spec: str, names: str) -> list[Column]:
    """``spec`` has one letter per column: s (text) or i (integer), as in PgBouncer."""
    return [(name, kind == "i") for kind, name in zip(spec, names.split(), strict=True)]


def _stamp(monotonic: float, now_mono: float, now_wall: float) -> str:
    """A monotonic instant as the wall-clock text PgBouncer prints."""
    wall = now_wall - (now_mono - monotonic)
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))


_POOLS = _cols("ssiiiiiiiiiiiiiss", "database user cl_active cl_waiting cl_active_cancel_req "
               "cl_waiting_cancel_req sv_active sv_active_cancel sv_being_canceled sv_idle "
               "sv_used sv_tested sv_login maxwait maxwait_us pool_mode load_balance_hosts")
_SOCKETS = _cols("ssssssisissiiissississ",
                 "type user database replication state addr port local_addr local_port "
                 "connect_time request_time wait wait_us close_needed ptr link remote_pid tls "
                 "application_name prepared_statements id tenant")
_STATS = _cols("siiiiiiiiiiiiiiiiiiiiiiii",
               "database total_server_assignment_count total_xact_count total_query_count "
               "total_received total_sent total_xact_time total_query_time total_wait_time "
               "total_client_parse_count total_server_parse_count total_bind_count "
               "total_client_login_count avg_server_assignment_count avg_xact_count "
               "avg_query_count avg_recv avg_sent avg_xact_time avg_query_time avg_wait_time "
               "avg_client_parse_count avg_server_parse_count avg_bind_count "
               "avg_client_login_count")
_DATABASES = _cols("ssissiiiissiiiiii",
                   "name host port database force_user pool_size min_pool_size "
                   "reserve_pool_size server_lifetime pool_mode load_balance_hosts "
                   "max_connections current_connections max_client_connections "
                   "current_client_connections paused disabled")
_TENANTS = _cols("sssiiiiii", "database tenant_type tenant cl_active cl_waiting cl_idle "
                 "xact_count total_wait_time avg_wait_time")
_LISTENERS = _cols("siiiiiiii", "database connected channels subscriptions delivered "
                   "dropped_queue_full dropped_pooled_server listener_losses backend_pid")
_HELP = ("SHOW POOLS|CLIENTS|SERVERS|STATS|DATABASES|CONFIG|VERSION|TENANTS|LISTENERS|HELP; "
         "PAUSE [db]; RESUME [db]; RELOAD; KILL <tenant>; SHUTDOWN")


class AdminServices(Protocol):
    """What the console reads and asks of the running proxy (the App, structurally): admin.py
    does not import the app, so the composition root stays on top (app -> admin, never back).
    """

    @property
    def config(self) -> Config: ...
    @property
    def pools(self) -> Mapping[str, Pool]: ...
    @property
    def clients(self) -> Iterable[ClientConnection]: ...
    @property
    def metrics(self) -> Metrics: ...

    def reload(self) -> list[str]: ...
    def kill_tenant(self, slug: str) -> int | None: ...
    def request_shutdown(self, why: str) -> None: ...
    def database_stats(self, name: str) -> tuple[list[int], list[int]]: ...


class AdminConsole:
    """One admin session: frames in, rows out."""

    def __init__(self, app: AdminServices, peer: AdminPeer):
        self.app = app
        self.peer = peer
        self.buf = bytearray()
        self._busy = False  # a command (PAUSE may wait) is running: later input waits
        self._skip_to_sync = False
        self._task: asyncio.Task[None] | None = None

    def feed(self, data: bytes) -> None:
        self.buf += data
        self._pump()

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _pump(self) -> None:
        buf = self.buf
        while not self._busy:
            try:
                end = frame_at(buf, 0, ADMIN_LIMIT)
            except FrameError:
                self.peer.write(codec.error_response("08P01", "invalid message length",
                                                     severity="FATAL"))
                self.peer.close("protocol error on the admin console")
                return
            if end < 0:
                return
            t = buf[0]
            body = bytes(buf[HEADER_SIZE:end])
            del buf[:end]
            if t == QUERY:
                self._busy = True
                self._task = asyncio.ensure_future(self._run(body.rstrip(b"\x00")))
                self._task.add_done_callback(self._done)
            elif t == TERMINATE:
                self.peer.close("admin sent Terminate")
                return
            elif t in _EXTENDED:
                if t == SYNC:
                    self._skip_to_sync = False
                    self.peer.write(_Z_IDLE)
                elif not self._skip_to_sync:
                    self._skip_to_sync = True
                    self.peer.write(codec.error_response(
                        "0A000", "the admin console speaks the simple query protocol only",
                        hint="use psql, or a driver's simple-query mode"))
            else:
                self.peer.write(codec.error_response(
                    "08P01", f"unexpected message type {chr(t)!r}", severity="FATAL"))
                self.peer.close("protocol error on the admin console")
                return

    def _done(self, task: asyncio.Task[None]) -> None:
        self._busy = False
        if not task.cancelled() and task.exception() is not None:
            log.error("admin command failed", exc_info=task.exception())
            self.peer.write(codec.error_response("XX000", "internal error in the admin console")
                            + _Z_IDLE)
        self._pump()

    async def _run(self, text: bytes) -> None:
        out = bytearray()
        commands = [c.strip() for c in text.decode("utf-8", "replace").split(";")]
        commands = [c for c in commands if c]
        if not commands:
            out += codec.empty_query_response()
        for command in commands:
            log.info("admin: user=%s client=%s command=%r", self.peer.user, self.peer.peer_host,
                     command)
            try:
                out += await self.execute(command)
            except AdminError as exc:
                out += codec.error_response(exc.sqlstate, exc.message, hint=exc.hint)
                break
            except ProxyError as exc:
                out += codec.error_response(exc.sqlstate, exc.message, hint=exc.hint)
                break
        self.peer.write(bytes(out) + _Z_IDLE)

    # ------------------------------------------------------------------ commands

    async def execute(self, command: str) -> bytes:
        """Returns: the replies to one command (without ReadyForQuery)."""
        words = command.split()
        verb = words[0].upper()
        args = words[1:]
        if verb == "SHOW":
            if len(args) != 1:
                raise AdminError(f"usage: SHOW <what>; {_HELP}")
            show = self._SHOW.get(args[0].lower())
            if show is None:
                raise AdminError(f"unknown SHOW item {args[0]!r}", hint=_HELP)
            return show(self)
        if verb in ("PAUSE", "RESUME"):
            pools = self._pools(args)
            if verb == "PAUSE":
                await asyncio.gather(*(pool.pause() for pool in pools))
            else:
                if not any(pool.paused for pool in pools):
                    raise AdminError("not paused", sqlstate="55000")
                for pool in pools:
                    pool.resume()
            return codec.command_complete(verb)
        if verb == "RELOAD" and not args:
            try:
                notes = self.app.reload()
            except ConfigError as exc:
                raise AdminError(f"reload failed, the running configuration stays: "
                                 f"{exc.message}", sqlstate=exc.sqlstate) from exc
            return b"".join(codec.notice_response("00000", n) for n in notes) + \
                codec.command_complete("RELOAD")
        if verb == "KILL" and len(args) == 1:
            killed = self.app.kill_tenant(args[0])
            if killed is None:
                raise AdminError(f"no tenant {args[0]!r} is known to this proxy",
                                 sqlstate="42704")
            return (codec.notice_response("00000", f"{killed} client connection(s) of tenant "
                                                   f"{args[0]!r} terminated")
                    + codec.command_complete("KILL"))
        if verb == "SHUTDOWN" and not args:
            self.app.request_shutdown("admin SHUTDOWN")
            return codec.command_complete("SHUTDOWN")
        raise AdminError(f"unknown admin command: {command!r}", hint=_HELP)

    def _pools(self, args: list[str]) -> list[Any]:
        if not args:
            return list(self.app.pools.values())
        if len(args) == 1 and args[0] in self.app.pools:
            return [self.app.pools[args[0]]]
        raise AdminError(f"no database {' '.join(args)!r} in this proxy", sqlstate="3D000")

    def _clients(self) -> list[ClientConnection]:
        return [c for c in self.app.clients if c.database != ADMIN_DATABASE]

    def _show_pools(self) -> bytes:
        now = time.monotonic()
        rows = []
        for name, pool in self.app.pools.items():
            mine = [c for c in self._clients() if c.database == name and c.stats is not None]
            waits = [now - c.wait_started for c in mine if c.waiting]
            maxwait = max(waits, default=0.0)
            sv = {state: len(members) for state, members in pool.containers.items()}
            rows.append([name, pool.db.dsn.user,
                         sum(1 for c in mine if not c.waiting), len(waits), 0, 0,
                         sv[ServerState.ACTIVE], 0, 0, sv[ServerState.IDLE], 0,
                         sv[ServerState.RESET], sv[ServerState.LOGIN], int(maxwait),
                         int(maxwait * 1e6) % 1_000_000, "transaction", None])
        return _table(_POOLS, rows)

    def _show_clients(self) -> bytes:
        now, wall = time.monotonic(), time.time()
        rows = []
        for c in self.app.clients:
            wait = now - c.wait_started if c.waiting else 0.0
            state = "waiting" if c.waiting else ("active" if c.state.value == "ready"
                                                 else "login")
            addr, port, laddr, lport = c.addresses()
            server = c.server
            tenant = c.context.identity.slug if c.context is not None else None
            rows.append(["C", c.user, c.database, "none", state, addr, port, laddr, lport,
                         _stamp(c.connected_at, now, wall), _stamp(c.last_request, now, wall),
                         int(wait), int(wait * 1e6) % 1_000_000, 0, f"{id(c):#x}",
                         f"{id(server):#x}" if server is not None else "", 0,
                         "TLS" if c.tls else "", c.application_name, c.prepared_count,
                         c.cancel_key[0] if c.cancel_key else 0, tenant])
        return _table(_SOCKETS, rows)

    def _show_servers(self) -> bytes:
        now, wall = time.monotonic(), time.time()
        rows = []
        for name, pool in self.app.pools.items():
            for state, members in pool.containers.items():
                for s in members:
                    peer = s.peer
                    client = getattr(peer, "client", None)  # session.Session's
                    tenant = (client.context.identity.slug
                              if client is not None and client.context is not None else None)
                    label = {"idle": "idle", "active": "active", "reset": "tested",
                             "login": "login"}[state.value]
                    rows.append(["S", pool.db.dsn.user, name, "none", label, pool.db.dsn.host,
                                 pool.db.dsn.port, None, None, _stamp(s.created_at, now, wall),
                                 _stamp(s.last_used, now, wall), 0, 0, 0, f"{id(s):#x}",
                                 f"{id(client):#x}" if client is not None else "",
                                 s.login.backend_pid if s.login is not None else 0,
                                 "TLS" if s.tls_in_use else "", "pgtenant", len(s.prepared),
                                 s.id, tenant])
        return _table(_SOCKETS, rows)

    def _show_stats(self) -> bytes:
        rows = []
        for name in self.app.pools:
            total, avg = self.app.database_stats(name)
            rows.append([name, *total, *avg])
        return _table(_STATS, rows)

    def _show_databases(self) -> bytes:
        rows = []
        config = self.app.config
        for name, pool in self.app.pools.items():
            dsn = pool.db.dsn
            clients = sum(1 for c in self._clients() if c.database == name)
            rows.append([name, dsn.host, dsn.port, dsn.dbname, dsn.user, pool.db.pool_size,
                         pool.db.min_pool_size, pool.db.reserve_pool, 0, "transaction", None,
                         pool.db.pool_size, pool.total,
                         config.max_client_conn, clients, int(pool.paused), 0])
        return _table(_DATABASES, rows)

    def _show_config(self) -> bytes:
        return _table(_cols("ssss", "key value default changeable"),
                      config_rows(self.app.config))

    def _show_version(self) -> bytes:
        # PgBouncer's one column, then which protocol core runs (compiled or pure: issue 16).
        return _table([("version", False), ("build", False)],
                      [[f"pgtenant {__version__}", build_kind()]])

    def _show_tenants(self) -> bytes:
        counts: dict[tuple[str, str, str], list[int]] = {}
        for c in self._clients():
            if c.context is None or c.stats is None:
                continue
            key = (c.database, c.tenant_type, c.context.identity.slug)
            row = counts.setdefault(key, [0, 0, 0])
            row[1 if c.waiting else 0 if c.server is not None else 2] += 1
        rows = []
        for key in sorted(set(counts) | set(self.app.metrics.tenants)):
            active, waiting, idle = counts.get(key, [0, 0, 0])
            t = self.app.metrics.tenants.get(key)
            xacts = t.transactions if t is not None else 0
            wait_total = t.wait_total if t is not None else 0.0
            avg = wait_total / t.wait_count if t is not None and t.wait_count else 0.0
            rows.append([*key, active, waiting, idle, xacts, int(wait_total * 1e6),
                         int(avg * 1e6)])
        return _table(_TENANTS, rows)

    def _show_listeners(self) -> bytes:
        """LISTEN/NOTIFY (notify.py): each database's listener connection and counters."""
        rows = []
        for name, pool in sorted(self.app.pools.items()):
            notifier = pool.notifier
            st = notifier.stats
            login = notifier.server.login if notifier.server is not None else None
            rows.append([name, int(notifier.up), len(notifier.channels),
                         sum(len(subs) for _, subs in notifier.channels.values()),
                         st.delivered, st.dropped_queue_full, st.dropped_pooled,
                         st.listener_losses, login.backend_pid if login is not None else None])
        return _table(_LISTENERS, rows)

    def _show_help(self) -> bytes:
        return codec.notice_response("00000", f"Console usage: {_HELP}") + \
            codec.command_complete("SHOW")

    _SHOW: Final[dict[str, Callable[[AdminConsole], bytes]]] = {
        "pools": _show_pools, "clients": _show_clients, "servers": _show_servers,
        "stats": _show_stats, "databases": _show_databases, "config": _show_config,
        "version": _show_version, "tenants": _show_tenants, "listeners": _show_listeners,
        "help": _show_help,
    }


def config_rows(config: Config) -> list[list[object]]:
    """Returns: (key, value, default, changeable) for every scalar config key."""
    rows: list[list[object]] = []

    def walk(obj: Any, cls: type, prefix: str) -> None:
        default = cls() if prefix else None
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            key = prefix + f.name
            if dataclasses.is_dataclass(value):
                walk(value, type(value), key + ".")
                continue
            if isinstance(value, dict) or f.name in ("databases", "tenant_types"):
                continue
            if "secret" in f.name or "password" in f.name:
                value = "********" if value else value
            if default is not None:
                dflt: object = getattr(default, f.name)
            elif f.default is not dataclasses.MISSING:
                dflt = f.default
            elif f.default_factory is not dataclasses.MISSING:
                dflt = f.default_factory()
            else:
                dflt = None
            changeable = "yes" if f.metadata.get("reload", True) else "no"
            rows.append([key, _show(value), _show(dflt), changeable])

    walk(config, Config, "")
    return rows


def _show(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int) \
            and isinstance(value[0], str):
        return f"{value[0]}:{value[1]}"
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return str(value)
