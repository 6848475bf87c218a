"""Step-by-step tests of the replies-owed ledger (protocol/ledger.py), without framing."""

from __future__ import annotations

import dataclasses
from collections import deque

import pytest

from pgtenant.protocol.ledger import PASS_ALL, PASS_EXEC, PASS_NONE, Ledger, Segment
from pgtenant.protocol.replies import (
    BIND_FWD,
    DROP,
    EXEC_FWD,
    FWD,
    SYNTH,
    TERMINAL_OF,
    Expected,
    ReplyKind,
    expected,
)


def extended(ledger: Ledger) -> Segment:
    seg = Segment(0)
    seg.expect = deque()
    ledger.push(seg)
    return seg


def test_expected_entries_are_immutable_so_constants_can_be_shared() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(BIND_FWD, "action", DROP)  # noqa: B010 (the attribute assignment is the test)
    assert Expected(ReplyKind.BIND, FWD) == BIND_FWD
    fast = expected(ReplyKind.BIND, FWD, b"g")
    assert fast == Expected(ReplyKind.BIND, FWD, b"g") and fast is not BIND_FWD
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(fast, "data", None)  # noqa: B010 (the attribute assignment is the test)


def test_every_kind_has_its_terminal_replies() -> None:
    assert len(TERMINAL_OF) == len(ReplyKind)
    assert TERMINAL_OF[ReplyKind.EXECUTE] == frozenset(b"CIs")
    assert TERMINAL_OF[ReplyKind.DESCRIBE_STATEMENT] == frozenset(b"Tn")
    assert TERMINAL_OF[ReplyKind.QUERY] == frozenset()


def test_synth_reply_whose_turn_came_is_answered_at_once() -> None:
    ledger = Ledger()
    seg = extended(ledger)
    assert ledger.expect(Expected(ReplyKind.CLOSE, SYNTH, b"3")) == b"3"
    assert seg.expect == deque()


def test_synth_reply_behind_an_owed_one_waits() -> None:
    ledger = Ledger()
    seg = extended(ledger)
    assert ledger.expect(BIND_FWD) == b""
    synth = Expected(ReplyKind.CLOSE, SYNTH, b"3")
    assert ledger.expect(synth) == b""
    assert seg.expect == deque([BIND_FWD, synth])


def test_pass_set_follows_the_head_segment() -> None:
    ledger = Ledger()
    assert ledger.pass_ is PASS_NONE
    seg = extended(ledger)
    ledger.expect(EXEC_FWD)
    assert ledger.pass_ is PASS_EXEC  # rows of the client's Execute go through unread
    seg.expect = None
    ledger.update_pass()
    assert ledger.pass_ is PASS_ALL
    ledger.pending.popleft()
    ledger.update_pass()
    assert ledger.pass_ is PASS_NONE


def test_unsure_counts_each_segment_once() -> None:
    ledger = Ledger()
    seg = extended(ledger)
    ledger.mark_txn(seg)
    ledger.mark_txn(seg)
    assert ledger.unsure == 1
    ledger.reset()
    assert (ledger.unsure, len(ledger.pending), ledger.pass_) == (0, 0, PASS_NONE)
