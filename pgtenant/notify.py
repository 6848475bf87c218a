"""The listener connection of one database: LISTEN on the server channels tenants listen to,
and fan each notification out to the clients listening to it.

Owns one backend connection per database (logged in like the pool's servers, as the proxy's
login role: LISTEN needs no privilege), which server channels it LISTENs to, and who listens
to each. It does not own a client's LISTEN state nor the channel mapping
(protocol/listen.py), nor when a client may be sent a notification (session.py).

Theory of operation
-------------------
``channels`` maps a server channel (protocol/listen.py ``channel_name``: private to one
tenant) to the client's spelling of it and the subscribers listening to it. The first
subscriber of a channel makes the listener ``LISTEN`` it, the last one going ``UNLISTEN``s it;
statements go out one Query each, and ``_inflight`` records, per Query, the channels whose
LISTEN its ReadyForQuery confirms. A subscribe returns whether the channel is heard already;
if not, the subscriber's ``listener_caught_up`` is called once it is (or once the listener gave
up trying, so no client waits forever). The connection is made on the first subscribe.

A NotificationResponse is sent to each subscriber of its channel, rewritten with the channel
as that client spelled it. Its pid is the notifying client's (proxy) pid when the NOTIFY was a
statement the proxy rewrote (``expect``: keyed by the pooled server's pid, channel and
payload); that client itself is skipped, having delivered its own notification before its
COMMIT's ReadyForQuery (protocol/listen.py). Other notifications (``pgtenant.pg_notify``,
triggers) carry pid 0: the backend that sent them is a pooled server, not a client.

On loss of the connection: logged, counted, and reconnected with backoff (``_BACKOFF``); on
reconnect every channel is LISTENed again. Notifications sent while it was away are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Final, Protocol

from .config import Dsn
from .errors import ProxyError
from .protocol import codec
from .protocol.constants import ERROR_RESPONSE, NOTIFICATION_RESPONSE, READY_FOR_QUERY
from .protocol.frames import NO_LIMIT, FrameError, frame_at
from .protocol.listen import notification, parse_notification
from .server import ServerConnection
from .stats import NotifyStats
from .tls import BackendTls

__all__ = ["Notifier", "Subscriber"]

log = logging.getLogger("pgtenant.notify")
_BACKOFF: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)  # seconds before each reconnect attempt
# Own NOTIFYs remembered until the listener hears them (oldest forgotten first): a NOTIFY
# nobody hears is never matched, so the table is bounded.
_EXPECT_MAX: Final = 4096
# How long a client's COMMIT waits at most for the listener to hear its NOTIFY (a safety
# net: the listener hears a committed notification on a channel it listens to).
_ECHO_WAIT: Final = 2.0


class Subscriber(Protocol):
    """A client listening to channels (session.py's Session)."""

    @property
    def notify_pid(self) -> int: ...  # its BackendKeyData pid

    # NotificationResponses for it, in order: those one read of the listener brought, so
    # that notifications Postgres sent together reach the client together (psycopg's
    # notifies(stop_after=) counts on it)
    def notified(self, frames: list[bytes]) -> None: ...
    # what it waited for happened: the channel it listens to is heard, or its NOTIFY was
    # (or the listener gave up: nobody waits forever)
    def listener_caught_up(self) -> None: ...


class Notifier:
    """The listener of one database; see the module docstring."""

    def __init__(self, name: str, dsn: Callable[[], Dsn], tls: BackendTls | None,
                 connect_timeout: Callable[[], float]):
        self.name = name
        self._dsn = dsn  # read at each connect: the pool's current dsn
        self._tls = tls
        self._connect_timeout = connect_timeout
        self.stats = NotifyStats()
        # server channel -> (the client's spelling, its subscribers)
        self.channels: dict[str, tuple[str, dict[Subscriber, None]]] = {}
        self.heard: set[str] = set()  # channels whose LISTEN the server confirmed
        self._waiters: dict[str, list[Subscriber]] = {}  # channel -> subscribers waiting
        self._inflight: deque[list[str]] = deque()  # per Query sent: the channels it LISTENs
        self._expected: OrderedDict[tuple[int, str, bytes], Subscriber] = OrderedDict()
        self.server: ServerConnection | None = None  # logged in and ours
        self._task: asyncio.Task[None] | None = None  # connecting (with backoff)
        self._buf = bytearray()
        self._batch: dict[Subscriber, list[bytes]] = {}  # fan-out of the current read
        # Own NOTIFYs whose notifier waits until the listener heard them (``await_echo``).
        self._echo_waiters: dict[tuple[int, str, bytes], Subscriber] = {}
        self._echoed: list[Subscriber] = []  # heard in the current read: woken after it
        self.closed = False

    def __repr__(self) -> str:
        return f"<Notifier {self.name} channels={len(self.channels)} up={self.up}>"

    @property
    def up(self) -> bool:
        """Whether the listener connection is logged in."""
        return self.server is not None

    # ------------------------------------------------------------------ subscribers

    def subscribe(self, sub: Subscriber, mapped: str, channel: str) -> bool:
        """``sub`` listens to server channel ``mapped`` (spelled ``channel`` by the client).

        Returns: True when the channel is heard already; else ``sub.listener_caught_up()``
        follows once it is (or once the listener could not be reached: no client waits
        forever for it).
        """
        entry = self.channels.get(mapped)
        if entry is None:
            entry = self.channels[mapped] = (channel, {})
            if self.server is not None:
                self._send([mapped], f'LISTEN "{mapped}"')
            else:
                self._start()
        entry[1][sub] = None
        if mapped in self.heard:
            return True
        if self.server is None and self._task is None:
            return True  # closed: nothing to wait for
        self._waiters.setdefault(mapped, []).append(sub)
        return False

    def unsubscribe(self, sub: Subscriber, mapped: str) -> None:
        """``sub`` no longer listens to ``mapped``; the last one going UNLISTENs it."""
        entry = self.channels.get(mapped)
        if entry is None:
            return
        entry[1].pop(sub, None)
        waiters = self._waiters.get(mapped)
        if waiters and sub in waiters:
            waiters.remove(sub)
        if entry[1]:
            return
        del self.channels[mapped]
        self.heard.discard(mapped)
        self._waiters.pop(mapped, None)
        if self.server is not None:
            self._send([], f'UNLISTEN "{mapped}"')

    def expect(self, server_pid: int, mapped: str, payload: bytes, sub: Subscriber) -> None:
        """``sub`` sent NOTIFY ``mapped`` through the pooled server ``server_pid``: when the
        listener hears it, its pid is ``sub``'s and ``sub`` itself is skipped."""
        if mapped not in self.channels:
            return  # nobody listens: the listener will not hear it
        key = (server_pid, mapped, payload)
        self._expected[key] = sub
        self._expected.move_to_end(key)
        while len(self._expected) > _EXPECT_MAX:
            self._expected.popitem(last=False)

    def unexpect(self, server_pid: int, mapped: str, payload: bytes) -> None:
        """The NOTIFY ``expect`` recorded was rolled back."""
        self._expected.pop((server_pid, mapped, payload), None)

    def await_echo(self, server_pid: int, mapped: str, payload: bytes,
                   sub: Subscriber) -> bool:
        """The NOTIFY ``expect`` recorded was committed.

        Returns: True when the listener has yet to hear it and will (it listens to the
        channel); then ``sub.listener_caught_up()`` follows once it did, after every other
        listening client was sent it (or after ``_ECHO_WAIT`` seconds at most).
        """
        key = (server_pid, mapped, payload)
        if self.server is None or key not in self._expected or mapped not in self.heard:
            return False
        self._echo_waiters[key] = sub
        asyncio.get_running_loop().call_later(_ECHO_WAIT, self._echo_timeout, key)
        return True

    def _echo_timeout(self, key: tuple[int, str, bytes]) -> None:
        sub = self._echo_waiters.pop(key, None)
        if sub is not None:
            log.warning("database=%s listener: a committed NOTIFY was not heard within %gs",
                        self.name, _ECHO_WAIT)
            sub.listener_caught_up()

    # ------------------------------------------------------------------ the connection

    def _start(self) -> None:
        if self._task is None and self.server is None and not self.closed:
            self._task = asyncio.ensure_future(self._connect_loop())

    async def _connect_loop(self) -> None:
        """Connect (retrying with backoff) and LISTEN on every channel wanted."""
        attempt = 0
        try:
            while not self.closed and self.channels:
                server = ServerConnection(self._dsn(), self._on_lost, self._tls)
                try:
                    await server.connect(self._connect_timeout())
                except ProxyError as exc:
                    delay = _BACKOFF[min(attempt, len(_BACKOFF) - 1)]
                    attempt += 1
                    log.error("database=%s listener connect failed (retrying in %gs): %s",
                              self.name, delay, exc.message)
                    self._wake_all()  # their LISTEN is answered; delivery resumes later
                    await asyncio.sleep(delay)
                    continue
                self._buf.clear()
                server.peer = self
                self.server = server
                log.info("database=%s listener connected (backend pid %s), %d channel(s)",
                         self.name, server.login.backend_pid if server.login else "?",
                         len(self.channels))
                if self.channels:
                    names = list(self.channels)
                    self._send(names, "; ".join(f'LISTEN "{m}"' for m in names))
                return
        finally:
            self._task = None

    def _send(self, channels: list[str], sql: str) -> None:
        assert self.server is not None
        self._inflight.append(channels)
        self.server.write(codec.query(sql))

    def _wake(self, channels: list[str]) -> None:
        for mapped in channels:
            for sub in self._waiters.pop(mapped, []):
                sub.listener_caught_up()

    def _wake_all(self) -> None:
        self._wake(list(self._waiters))
        echo_waiters, self._echo_waiters = self._echo_waiters, {}
        for sub in echo_waiters.values():
            sub.listener_caught_up()

    def _on_lost(self, server: ServerConnection) -> None:
        """ServerConnection's on_lost: the peer callbacks below do the work."""

    # ServerPeer: the listener connection's bytes come here.
    def server_data(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        try:
            while (end := frame_at(buf, pos, NO_LIMIT)) >= 0:
                self._frame(buf[pos], bytes(buf[pos + 5 : end]))
                pos = end
        except (FrameError, ValueError) as exc:
            log.error("database=%s listener: bad frame from the server (%s); reconnecting",
                      self.name, exc)
            del buf[:]
            if self.server is not None:
                self.server.close()
        else:
            del buf[:pos]
        batch, self._batch = self._batch, {}
        for sub, frames in batch.items():
            sub.notified(frames)
        echoed, self._echoed = self._echoed, []
        for sub in echoed:  # after the others were sent it
            sub.listener_caught_up()

    def _frame(self, t: int, body: bytes) -> None:
        if t == NOTIFICATION_RESPONSE:
            self._fan_out(*parse_notification(body))
        elif t == READY_FOR_QUERY:
            channels = self._inflight.popleft() if self._inflight else []
            heard = [m for m in channels if m in self.channels]
            self.heard.update(heard)
            self._wake(channels)
        elif t == ERROR_RESPONSE:
            fields = dict(codec.parse_error_fields(body))
            log.error("database=%s listener: %s", self.name,
                      fields.get(ord("M"), b"").decode("utf-8", "replace"))
        # CommandComplete, notices, parameter reports: nothing to do

    def _fan_out(self, pid: int, mapped_bytes: bytes, payload: bytes) -> None:
        mapped = mapped_bytes.decode("utf-8", "replace")
        entry = self.channels.get(mapped)
        key = (pid, mapped, payload)
        sender = self._expected.pop(key, None)
        waiter = self._echo_waiters.pop(key, None)
        if waiter is not None:
            self._echoed.append(waiter)
        if entry is None:
            return  # unlistened meanwhile
        channel, subs = entry
        frame = notification(sender.notify_pid if sender is not None else 0,
                             channel.encode(), payload)
        batch = self._batch
        for sub in subs:
            if sub is not sender:  # it delivered its own (protocol/listen.py)
                batch.setdefault(sub, []).append(frame)

    def server_lost(self, exc: Exception | None) -> None:
        self.server = None
        self._inflight.clear()
        self.heard.clear()
        self._expected.clear()
        if self.closed:
            return
        self.stats.listener_losses += 1
        log.warning("database=%s listener connection lost (%s): notifications sent until it "
                    "is back are lost; reconnecting", self.name, exc or "closed by the server")
        self._wake_all()
        self._start()

    def server_pause_writing(self) -> None:
        """Only LISTEN/UNLISTEN are written: nothing to hold back."""

    def server_resume_writing(self) -> None:
        """See server_pause_writing."""

    # ------------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Close the listener connection; no reconnect follows."""
        self.closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ProxyError):
                await task
        if self.server is not None:
            self.server.close()
            self.server = None
        self._wake_all()
