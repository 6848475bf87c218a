"""Tenant-scoped LISTEN/NOTIFY, the sans-I/O part (protocol/listen.py): the channel mapping,
NotificationResponse bytes, and one client's LISTEN state through its transactions."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from pgtenant.protocol import codec
from pgtenant.protocol.constants import TXN_BLOCK, TXN_FAILED, TXN_IDLE
from pgtenant.protocol.ledger import Segment
from pgtenant.protocol.listen import (
    QUEUE_BYTES,
    Listens,
    channel_name,
    notification,
    parse_notification,
)
from pgtenant.protocol.tracker import HOLD, IDLE, Link
from pgtenant.stats import NotifyStats

from .links import (
    BIND_COMPLETE,
    INJECTED,
    PARSE_COMPLETE,
    ROW,
    ROWDESC,
    Z_I,
    Z_T,
    Registrar,
    cc,
    client_sends,
    make_link,
    server_sends,
    start,
)

# The replies to the extended context injection (Parse, Bind, Execute, Close of the context).
INJECTED_EXT = (PARSE_COMPLETE + BIND_COMPLETE + codec.frame(ord("D"), b"\x00\x00")
                + cc("SELECT 1") + codec.frame(ord("3"), b""))

KEY = b"k" * 32
ORG = "7d1c6a3e-0000-4000-8000-000000000001"


def listens(confirm: bool = True) -> tuple[Listens, Registrar]:
    reg = Registrar(confirm)
    obj = Listens(KEY, ORG, "sme", reg, NotifyStats())
    obj.pid = 4242
    return obj, reg


def z(status: int) -> bytes:
    return codec.ready_for_query(bytes((status,)))


def test_channel_name_is_an_hmac_of_tenant_type_and_channel_within_namedatalen() -> None:
    name = channel_name(KEY, ORG, "sme", "news")
    digest = hmac.new(KEY, f"notify|{ORG}|sme|news".encode(), hashlib.sha256).hexdigest()
    assert name == "pgtenant_" + digest[:40]
    assert len(name.encode()) <= 63
    # Another tenant, another type, another channel, another key: another name.
    others = {channel_name(KEY, ORG.replace("1", "2"), "sme", "news"),
              channel_name(KEY, ORG, "enterprise", "news"),
              channel_name(KEY, ORG, "sme", "News"),
              channel_name(b"x" * 32, ORG, "sme", "news")}
    assert name not in others and len(others) == 4


def test_notification_round_trip() -> None:
    frame = notification(7, b"news", b"hello")
    assert frame[:1] == b"A"
    assert parse_notification(frame[5:]) == (7, b"news", b"hello")
    with pytest.raises(ValueError):
        parse_notification(b"\x00\x00\x00\x07news")


def test_listen_when_idle_subscribes_now_and_answers_listen() -> None:
    obj, reg = listens()
    reply = obj.answer(b"LISTEN News", TXN_IDLE, "UTF8")
    assert reply == codec.command_complete("LISTEN") + z(TXN_IDLE)
    assert reg.calls == [("subscribe", obj.mapped("news"), "news")]  # folded like Postgres
    assert obj.answer(b'UNLISTEN "news"', TXN_IDLE, "UTF8") == (
        codec.command_complete("UNLISTEN") + z(TXN_IDLE))
    assert reg.calls[-1] == ("unsubscribe", obj.mapped("news"))
    assert obj.channels == {}


def test_listen_waits_for_the_listener_when_the_channel_is_not_heard_yet() -> None:
    obj, _ = listens(confirm=False)
    assert obj.answer(b"listen jobs", TXN_IDLE, "UTF8") == b""
    assert obj.waiting
    assert obj.confirmed() == codec.command_complete("LISTEN") + z(TXN_IDLE)
    assert not obj.waiting


def test_listen_in_a_block_takes_effect_at_commit_only() -> None:
    obj, reg = listens()
    assert obj.answer(b"LISTEN a", TXN_BLOCK, "UTF8") == (
        codec.command_complete("LISTEN") + z(TXN_BLOCK))
    assert reg.calls == [] and obj.channels == {}
    obj.settle(Segment(0), TXN_BLOCK)  # a statement in the block
    assert obj.channels == {}
    obj.settle(Segment(0), TXN_IDLE)  # COMMIT
    assert list(obj.channels) == ["a"]
    # Rolled back: dropped.
    obj.answer(b"LISTEN b", TXN_BLOCK, "UTF8")
    rollback = Segment(0)
    rollback.rollback = True
    obj.settle(rollback, TXN_IDLE)
    assert list(obj.channels) == ["a"]
    # An error in the block: dropped too (COMMIT of a failed block rolls back).
    obj.answer(b"UNLISTEN *", TXN_BLOCK, "UTF8")
    obj.settle(Segment(0), TXN_FAILED)
    obj.settle(Segment(0), TXN_IDLE)
    assert list(obj.channels) == ["a"]


def test_listen_in_a_failed_block_or_with_other_statements_is_not_answered() -> None:
    obj, reg = listens()
    assert obj.answer(b"LISTEN a", TXN_FAILED, "UTF8") is None  # the server: 25P02
    assert obj.answer(b"LISTEN a; SELECT 1", TXN_IDLE, "UTF8") is None  # the guard
    assert obj.answer(b"NOTIFY a", TXN_IDLE, "UTF8") is None  # rewritten instead
    assert obj.is_listen(b"unlisten *") and not obj.is_listen(b"NOTIFY a")
    assert obj.answer("LISTEN café".encode(), TXN_IDLE, "LATIN1") is None
    assert reg.calls == []


def test_notify_is_rewritten_to_the_mapped_channel_and_own_notifications_come_at_commit(
) -> None:
    obj, reg = listens()
    obj.answer(b"LISTEN news", TXN_IDLE, "UTF8")
    mapped = obj.mapped("news")
    assert obj.rewrite(b"NOTIFY news, 'it''s'", "UTF8", record=True) == (
        f"NOTIFY \"{mapped}\", 'it''s'".encode())
    assert obj.rewrite(b"notify news, 'it''s'", "UTF8", record=True) is not None  # a dup
    assert obj.rewrite(b"NOTIFY other", "UTF8", record=True) == (
        f'NOTIFY "{obj.mapped("other")}"'.encode())
    assert obj.rewrite(b"SELECT 1", "UTF8", record=True) is None
    assert [c for c in reg.calls if c[0] == "notifying"] == [
        ("notifying", mapped, "it's"), ("notifying", obj.mapped("other"), "")]
    obj.settle(Segment(0), TXN_IDLE)
    # Deduplicated as Postgres does; only the channel it listens to; its own pid.
    assert list(obj.queue) == [notification(4242, b"news", b"it's")]
    assert obj.flush() == notification(4242, b"news", b"it's") and not obj.queue


def test_rolled_back_notify_is_not_delivered() -> None:
    obj, reg = listens()
    obj.answer(b"LISTEN news", TXN_IDLE, "UTF8")
    obj.rewrite(b"NOTIFY news, 'x'", "UTF8", record=True)
    failed = Segment(0)
    failed.failed = True
    obj.settle(failed, TXN_IDLE)
    assert not obj.queue
    assert reg.calls[-1] == ("not_notified", obj.mapped("news"), "x")


def test_queue_is_bounded_and_drops_are_counted() -> None:
    obj, _ = listens()
    frame = notification(1, b"c", b"x" * 8000)
    while obj.enqueue(frame):
        pass
    assert obj.queued_bytes <= QUEUE_BYTES
    assert obj.stats is not None and obj.stats.dropped_queue_full == 1


def test_close_unsubscribes_every_channel() -> None:
    obj, reg = listens()
    for sql in (b"LISTEN a", b"LISTEN b", b"LISTEN a"):
        obj.answer(sql, TXN_IDLE, "UTF8")
    obj.close()
    assert sorted(c for c in reg.calls if c[0] == "unsubscribe") == sorted(
        [("unsubscribe", obj.mapped("a")), ("unsubscribe", obj.mapped("b"))])


# ---------------------------------------------------------------------- through a Link

def linked(confirm: bool = True) -> tuple[Link, Listens, Registrar]:
    link = make_link()
    obj, reg = listens(confirm)
    link.listens = obj
    link.notify_stats = obj.stats
    return link, obj, reg


def test_lone_listen_is_answered_without_a_server() -> None:
    link, obj, _ = linked()
    out, reply, outcome = client_sends(link, codec.query("LISTEN jobs"))
    assert (out, outcome) == (b"", IDLE)
    assert reply == cc("LISTEN") + Z_I
    assert list(obj.channels) == ["jobs"] and not link.attached


def test_listen_waiting_for_the_listener_holds_the_client() -> None:
    link, obj, _ = linked(confirm=False)
    out, reply, outcome = client_sends(link, codec.query("LISTEN jobs") + codec.query("SELECT 1"))
    assert (out, reply, outcome) == (b"", b"", HOLD)
    assert obj.waiting and link.cbuf == bytearray(codec.query("SELECT 1"))
    assert obj.confirmed() == cc("LISTEN") + Z_I


def test_notify_is_rewritten_and_own_notification_precedes_ready_for_query() -> None:
    link, obj, _ = linked()
    client_sends(link, codec.query("LISTEN jobs"))
    sent = start(link, codec.query("NOTIFY jobs, 'hi'"))
    assert f'NOTIFY "{obj.mapped("jobs")}", \'hi\''.encode() in sent
    assert b"NOTIFY jobs" not in sent
    seen = server_sends(link, INJECTED + cc("NOTIFY") + Z_I)
    assert seen == cc("NOTIFY") + notification(4242, b"jobs", b"hi") + Z_I


def test_notifications_from_a_pooled_server_never_reach_the_client() -> None:
    link, obj, _ = linked()
    start(link, codec.query("SELECT 1"))
    raw = notification(99, b"raw_channel", b"leak")
    seen = server_sends(link, INJECTED + raw + ROWDESC + raw + ROW + cc("SELECT 1") + raw + Z_I)
    assert seen == ROWDESC + ROW + cc("SELECT 1") + Z_I
    assert obj.stats is not None and obj.stats.dropped_pooled == 3


def test_listen_through_parse_takes_effect_when_its_transaction_commits() -> None:
    link, obj, reg = linked()
    batch = (codec.parse("", "LISTEN jobs") + codec.bind("", "", []) + codec.execute("", 0)
             + codec.sync())
    sent = start(link, batch)
    assert b'UNLISTEN "pgtenant_noop"' in sent and b"LISTEN jobs" not in sent
    assert obj.channels == {}  # not before the commit
    server_sends(link, INJECTED_EXT + PARSE_COMPLETE + BIND_COMPLETE + cc("UNLISTEN") + Z_I)
    assert list(obj.channels) == ["jobs"]
    assert reg.calls == [("subscribe", obj.mapped("jobs"), "jobs")]


def test_queued_notifications_go_out_before_the_next_idle_ready_for_query() -> None:
    link, obj, _ = linked()
    start(link, codec.query("BEGIN"))
    server_sends(link, INJECTED + cc("BEGIN") + Z_T)
    obj.enqueue(notification(7, b"jobs", b"later"))
    client_sends(link, codec.query("SELECT 1"))
    assert server_sends(link, ROWDESC + ROW + cc("SELECT 1") + Z_T) == (
        ROWDESC + ROW + cc("SELECT 1") + Z_T)  # in the block: kept
    client_sends(link, codec.query("COMMIT"))
    assert server_sends(link, cc("COMMIT") + Z_I) == (
        cc("COMMIT") + notification(7, b"jobs", b"later") + Z_I)


def test_discard_all_stops_listening() -> None:
    link, obj, reg = linked()
    client_sends(link, codec.query("LISTEN jobs"))
    _, reply, _ = client_sends(link, codec.query("DISCARD ALL"))
    assert reply == cc("DISCARD ALL") + Z_I
    assert obj.channels == {} and reg.calls[-1] == ("unsubscribe", obj.mapped("jobs"))
