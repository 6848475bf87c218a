"""The listener of a database (notify.py) without sockets: which statements it sends, how a
notification fans out, and who waits for what."""

from __future__ import annotations

from typing import Any, cast

from pgtenant.config import parse_dsn
from pgtenant.notify import Notifier
from pgtenant.protocol import codec
from pgtenant.protocol.listen import notification, parse_notification
from pgtenant.server import ServerConnection

Z_I = codec.ready_for_query(b"I")


class FakeServer:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.login = None

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        pass


class Sub:
    def __init__(self, pid: int):
        self.notify_pid = pid
        self.got: list[tuple[int, bytes, bytes]] = []
        self.writes = 0
        self.caught_up = 0

    def notified(self, frames: list[bytes]) -> None:
        self.writes += 1
        self.got += [parse_notification(f[5:]) for f in frames]

    def listener_caught_up(self) -> None:
        self.caught_up += 1


def up_notifier() -> tuple[Notifier, FakeServer]:
    notifier = Notifier("app", lambda: parse_dsn("postgresql://u@h/app"), None, lambda: 1.0)
    server = FakeServer()
    notifier.server = cast(ServerConnection, server)
    return notifier, server


def queries(server: FakeServer) -> list[bytes]:
    return [q[5:-1] for q in server.sent]


def test_first_subscriber_listens_last_one_unlistens_and_waiters_wake_on_its_reply() -> None:
    notifier, server = up_notifier()
    a, b = Sub(1), Sub(2)
    assert notifier.subscribe(cast(Any, a), "pgtenant_x", "news") is False
    assert notifier.subscribe(cast(Any, b), "pgtenant_x", "news") is False
    assert queries(server) == [b'LISTEN "pgtenant_x"']  # once
    notifier.server_data(codec.command_complete("LISTEN") + Z_I)
    assert (a.caught_up, b.caught_up) == (1, 1) and "pgtenant_x" in notifier.heard
    assert notifier.subscribe(cast(Any, Sub(3)), "pgtenant_x", "news") is True  # heard
    notifier.unsubscribe(cast(Any, a), "pgtenant_x")
    notifier.unsubscribe(cast(Any, b), "pgtenant_x")
    assert len(queries(server)) == 1  # the third still listens


def test_fan_out_renames_the_channel_skips_the_sender_and_writes_once_per_read() -> None:
    notifier, _ = up_notifier()
    listener, sender = Sub(10), Sub(20)
    for sub in (listener, sender):
        notifier.subscribe(cast(Any, sub), "pgtenant_x", "news")
    notifier.server_data(codec.command_complete("LISTEN") + Z_I)
    notifier.expect(555, "pgtenant_x", b"mine", cast(Any, sender))
    data = (notification(555, b"pgtenant_x", b"mine") + notification(777, b"pgtenant_x", b"other")
            + notification(777, b"pgtenant_unknown", b"nobody"))
    notifier.server_data(data[:7])  # cut anywhere: nothing yet
    assert listener.got == []
    notifier.server_data(data[7:])
    assert listener.got == [(20, b"news", b"mine"), (0, b"news", b"other")]
    assert listener.writes == 1  # together, as Postgres sent them
    assert sender.got == [(0, b"news", b"other")]  # its own one it delivered itself


async def test_a_committed_notify_is_waited_for_until_the_listener_heard_it() -> None:
    notifier, _ = up_notifier()
    listener, sender = Sub(10), Sub(20)
    notifier.subscribe(cast(Any, listener), "pgtenant_x", "news")
    notifier.server_data(codec.command_complete("LISTEN") + Z_I)
    notifier.expect(555, "pgtenant_x", b"p", cast(Any, sender))
    assert notifier.await_echo(555, "pgtenant_x", b"p", cast(Any, sender)) is True
    assert sender.caught_up == 0
    notifier.server_data(notification(555, b"pgtenant_x", b"p"))
    assert listener.got == [(20, b"news", b"p")] and sender.caught_up == 1
    # Nobody listens, or already heard: nothing to wait for.
    assert notifier.await_echo(555, "pgtenant_y", b"p", cast(Any, sender)) is False
    assert notifier.await_echo(555, "pgtenant_x", b"p", cast(Any, sender)) is False
    # Never heard: the safety net wakes it.
    notifier.expect(556, "pgtenant_x", b"q", cast(Any, sender))
    assert notifier.await_echo(556, "pgtenant_x", b"q", cast(Any, sender)) is True
    notifier._echo_timeout((556, "pgtenant_x", b"q"))  # what call_later runs
    assert sender.caught_up == 2


async def test_losing_the_connection_wakes_every_waiter_and_counts() -> None:
    notifier, _ = up_notifier()
    a = Sub(1)
    notifier.subscribe(cast(Any, a), "pgtenant_x", "news")
    notifier.server_lost(None)
    try:
        assert a.caught_up == 1 and notifier.heard == set() and not notifier.up
        assert notifier.stats.listener_losses == 1
    finally:
        await notifier.close()  # ends the reconnect it started
