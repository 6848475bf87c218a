"""One backend connection: connect, log in, carry an attached client's bytes, reset, close.

Owns the socket to Postgres and the one coroutine that drives login handshakes. It does not
decide who gets the connection (``pool.py``) nor interpret the client's protocol
(``protocol/tracker.py``); while a client is attached, bytes go straight to it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Protocol

from .config import Dsn
from .errors import ServerLoginFailed, ServerProtocolError, ServerUnavailable, connect_failure
from .pool_state import ServerState
from .protocol import codec
from .protocol.constants import (
    ERROR_RESPONSE,
    NOTICE_RESPONSE,
    PARAMETER_STATUS,
    READY_FOR_QUERY,
    SSL_REQUEST_CODE,
)
from .protocol.frames import HEADER_SIZE, LOGIN_LIMIT, NO_LIMIT, FrameError, frame_at
from .protocol.handshake import Frame, Handshake, LoginResult, Send, server_login
from .protocol.tracker import CTX_NONE
from .tls import BackendTls

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["ServerConnection", "ServerPeer", "ServerState", "send_cancel"]

log = logging.getLogger("pgtenant.server")
_Z = READY_FOR_QUERY
_E = ERROR_RESPONSE
_N = NOTICE_RESPONSE
_S = PARAMETER_STATUS
# The one-byte answers to an SSLRequest (not message types).
_SSL_YES = ord("S")
_SSL_NO = ord("N")


class ServerPeer(Protocol):
    """What an attached client must accept from its server."""

    def server_data(self, data: bytes) -> None: ...
    def server_lost(self, exc: Exception | None) -> None: ...
    def server_pause_writing(self) -> None: ...
    def server_resume_writing(self) -> None: ...


class ServerConnection(asyncio.Protocol):
    """A logged-in backend connection; the pool moves it between containers."""

    # A ClassVar: the only attribute mypyc's native classes let code assign through the class.
    _next_id: ClassVar[int] = 0

    def __init__(self, dsn: Dsn, on_lost: Callable[[ServerConnection], None],
                 tls: BackendTls | None = None):
        ServerConnection._next_id += 1
        self.id = ServerConnection._next_id
        self.dsn = dsn
        self.tls = tls
        self.tls_in_use = False
        self.state = ServerState.LOGIN  # only PoolState._set_state assigns this
        self.transport: asyncio.Transport | None = None
        self.peer: ServerPeer | None = None
        self.ctx_state = CTX_NONE
        # Proxy-global prepared statements that exist on this backend, least recently used
        # first (the tracker adds, evicts and forgets; see issue #4).
        # (The generation it was prepared at, see protocol/freshness.py; False: stale, may or
        # may not exist: Close before the next Parse.)
        self.prepared: OrderedDict[bytes, int] = OrderedDict()
        # The session's client_encoding, as the last client left it (the tracker switches
        # it to the next client's before that client's first message; see Link.encoding).
        self.client_encoding = "UTF8"
        self.login_encoding = "UTF8"  # what RESET ALL (DISCARD ALL) brings it back to
        # The tenant (Link.tenant_key) whose transactions last ran here: a server handed to
        # another tenant is emptied first (DISCARD ALL), so it carries nothing across.
        self.last_tenant: object = None
        # CancelRequests forwarded for this backend whose delivery is not settled yet: the
        # server goes to nobody else until they are (a late cancel must not hit the next
        # client's query; PgBouncer does the same).
        self.cancels_in_flight = 0
        self.on_cancels_settled: Callable[[], None] | None = None
        self.login: LoginResult | None = None
        self.created_at = time.monotonic()
        self.last_used = self.created_at
        self._on_lost = on_lost
        self._buf = bytearray()
        self._frame_waiter: asyncio.Future[None] | None = None
        self._reset_done: asyncio.Future[bool] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<Server #{self.id} {self.state.value} {self.dsn.host}:{self.dsn.port}>"

    # ------------------------------------------------------------------ connect and login

    async def connect(self, timeout: float, params: Iterable[tuple[str, str]] = ()) -> None:
        """Open the socket and log in.

        Raises: ServerUnavailable (unreachable, timeout) or ServerLoginFailed.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                if self.dsn.unix_socket:
                    await loop.create_unix_connection(lambda: self, self.dsn.unix_socket)
                else:
                    await loop.create_connection(lambda: self, self.dsn.host, self.dsn.port)
                    # Like libpq, no TLS over Unix sockets: they never leave the machine.
                    if self.tls is not None:
                        await self._negotiate_tls(self.tls)
                self.login = await self._drive(
                    server_login(self.dsn.user, self.dsn.password, self.dsn.dbname,
                                 [*self.dsn.params, *params])
                )
                self.client_encoding = dict(self.login.parameters).get("client_encoding",
                                                                       "UTF8")
                self.login_encoding = self.client_encoding
        except TimeoutError as timed_out:  # not `exc`: see test_compiled.py's except names
            self.close()
            raise ServerUnavailable(
                f"backend {self.dsn.host}:{self.dsn.port} did not accept a login within "
                f"{timeout:g}s (server_connect_timeout)"
            ) from timed_out
        except OSError as exc:
            self.close()
            raise ServerUnavailable(
                f"cannot connect to backend {self.dsn.host}:{self.dsn.port}: "
                f"{connect_failure(exc)}"
            ) from exc
        except BaseException:
            self.close()
            raise

    async def _negotiate_tls(self, tls: BackendTls) -> None:
        """SSLRequest, then on 'S' wrap the socket in TLS (libpq's sslmode rules).

        The login handshake then runs unchanged over the TLS transport: this protocol object
        stays the transport's application protocol and still receives plaintext.

        Raises: ServerLoginFailed when TLS is required but declined, or the handshake or
        certificate check fails; ServerProtocolError for an answer other than 'S'/'N';
        ServerUnavailable when the backend closes the connection.
        """
        assert self.transport is not None
        where = f"{self.dsn.host}:{self.dsn.port}"
        self.transport.write(struct.pack("!ii", 8, SSL_REQUEST_CODE))
        while not self._buf:
            if self._closed:
                raise ServerUnavailable(f"backend {where} closed the connection during TLS "
                                        "negotiation")
            self._frame_waiter = asyncio.get_running_loop().create_future()
            await self._frame_waiter
        answer = self._buf[0]
        if answer == _SSL_NO:
            del self._buf[:1]
            if tls.required:
                raise ServerLoginFailed(
                    f"backend {where} does not accept TLS connections "
                    f"(tls.server_tls = {tls.mode!r})",
                    hint="turn on ssl in the backend's postgresql.conf, or set "
                         "tls.server_tls = \"prefer\" or \"disable\"",
                )
            return
        if answer != _SSL_YES:
            raise ServerProtocolError(
                f"backend {where} answered SSLRequest with {bytes([answer])!r}"
            )
        if len(self._buf) > 1:
            # Bytes before the handshake would be trusted as if encrypted (CVE-2021-23222).
            raise ServerProtocolError(
                f"backend {where} sent unencrypted data after accepting TLS"
            )
        self._buf.clear()
        try:
            transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, tls.context, server_hostname=self.dsn.host
            )
        except BaseException as exc:
            # start_tls closed the socket on any failure (timeouts and cancellation too), and
            # uvloop may not report connection_lost: writing Terminate to it would raise.
            self._closed = True
            if not isinstance(exc, ssl.SSLError | ConnectionError):
                raise
            if isinstance(exc, ssl.SSLCertVerificationError):
                why = f"certificate verify failed: {exc.verify_message}"
            else:
                why = getattr(exc, "reason", None) or str(exc)
            raise ServerLoginFailed(
                f"TLS handshake with backend {where} failed (tls.server_tls = {tls.mode!r}): "
                f"{why}"
            ) from exc
        if transport is None:  # typeshed allows it; start_tls never returns None in practice
            raise ServerUnavailable(f"backend {where}: TLS upgrade returned no transport")
        self.transport = transport
        self.tls_in_use = True

    async def _drive(self, gen: Handshake) -> LoginResult:
        """The only awaiting code for handshakes (STYLE rule 1)."""
        assert self.transport is not None
        try:
            op = next(gen)
            while True:
                if isinstance(op, Send):
                    self.transport.write(op.data)
                    op = gen.send(None)
                else:
                    op = gen.send(await self._next_frame())
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _next_frame(self) -> Frame:
        while True:
            try:
                end = frame_at(self._buf, 0, LOGIN_LIMIT)
            except FrameError as exc:
                raise ServerProtocolError(
                    f"invalid frame length {exc.length} during login") from None
            if end >= 0:
                msg_type = self._buf[0]
                body = bytes(self._buf[HEADER_SIZE:end])
                del self._buf[:end]
                return msg_type, body
            if self._closed:
                raise ServerUnavailable("backend closed the connection during login")
            self._frame_waiter = asyncio.get_running_loop().create_future()
            await self._frame_waiter

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports are not asyncio.Transport subclasses, but speak its interface.
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:
            peer.server_data(data)
            return
        if self.state is ServerState.LOGIN:
            self._buf += data
            self._wake()
            return
        if self.state is ServerState.RESET:
            self._reset_data(data)
            return
        # Idle: Postgres says nothing to an idle session unless something is wrong (FATAL
        # before termination) or session state leaked (NOTIFY from a LISTEN). Fail closed.
        self._buf += data
        kinds = self._frame_types()
        if kinds - {_N, _S} or self._buf:
            # Anything but a notice or a parameter report, or half a frame that would later
            # be spliced in front of the next client's replies: this server is not clean.
            log.warning("%r sent %r while idle; closing it", self, bytes(sorted(kinds)))
            self.close()

    def _frame_types(self) -> set[int]:
        kinds: set[int] = set()
        pos = 0
        try:
            while (end := frame_at(self._buf, pos, NO_LIMIT)) >= 0:
                kinds.add(self._buf[pos])
                pos = end
        except FrameError:
            pass  # a bad length: left in the buffer, so the server is judged not clean
        del self._buf[:pos]
        return kinds

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wake()
        if self._reset_done is not None and not self._reset_done.done():
            self._reset_done.set_result(False)
        peer, self.peer = self.peer, None
        self._on_lost(self)
        if peer is not None:
            peer.server_lost(exc)

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.server_pause_writing()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.server_resume_writing()

    def _wake(self) -> None:
        waiter, self._frame_waiter = self._frame_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ data path helpers

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Terminate politely if we can, then drop the socket. Idempotent."""
        if self.transport is not None and not self._closed:
            self._closed = True
            try:
                self.transport.write(codec.terminate())
            finally:
                self.transport.close()

    # ------------------------------------------------------------------ reset

    async def reset(self, sql: str, timeout: float) -> bool:
        """Run the proxy's own clean-up ``sql`` on a server no client holds: ROLLBACK of
        the transaction a departed client left open, DISCARD TEMP of the temporary objects
        a client's transaction created (``Link.temp_made``), or both.

        Returns: True when the server answered without an error and ended with
        ReadyForQuery ``I`` (clean), else False.
        """
        assert self.state is ServerState.RESET
        self._buf.clear()
        self._reset_done = asyncio.get_running_loop().create_future()
        self.resume_reading()
        self.write(codec.query(sql))
        try:
            async with asyncio.timeout(timeout):
                return await self._reset_done
        except TimeoutError:
            return False
        finally:
            self._reset_done = None
            self._buf.clear()

    def _reset_data(self, data: bytes) -> None:
        self._buf += data
        pos = 0
        while True:
            try:
                end = frame_at(self._buf, pos, NO_LIMIT)
            except FrameError:  # a server that cannot be followed is not clean
                if self._reset_done is not None and not self._reset_done.done():
                    self._reset_done.set_result(False)
                break
            if end < 0:
                break
            msg_type = self._buf[pos]
            if msg_type == _Z and self._reset_done is not None and not self._reset_done.done():
                # Clean only if ReadyForQuery 'I' is the last thing the server sent.
                idle = self._buf[pos + HEADER_SIZE : end] == b"I"
                self._reset_done.set_result(idle and end == len(self._buf))
            elif msg_type == _E and self._reset_done is not None and not self._reset_done.done():
                self._reset_done.set_result(False)
            pos = end
        del self._buf[:pos]


async def send_cancel(dsn: Dsn, pid: int, secret: int, timeout: float = 5.0) -> None:
    """Forward a CancelRequest to the backend that runs ``pid``; errors are swallowed."""
    try:
        async with asyncio.timeout(timeout):
            if dsn.unix_socket:
                reader, writer = await asyncio.open_unix_connection(dsn.unix_socket)
            else:
                reader, writer = await asyncio.open_connection(dsn.host, dsn.port)
            writer.write(codec.cancel_request(pid, secret))
            await writer.drain()
            await reader.read()  # Postgres closes after reading the request
            writer.close()
    except (OSError, TimeoutError) as exc:
        log.warning("cancel request to %s:%s failed: %s", dsn.host, dsn.port, exc)

