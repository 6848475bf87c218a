"""What an idle client holds (issue 16, benchmarks/README.md "Memory per idle client"):
the structure that keeps it small, checked without counting bytes.

Every object the proxy keeps per client has slots and no ``__dict__``; a link with no server
attached holds no FIFO of its own; the context bytes are shared by the clients of one
context and settings, and only by them.
"""

from __future__ import annotations

import uuid

import pytest

from pgtenant.client import ClientConnection
from pgtenant.config import TenantTypeConfig
from pgtenant.guard import PinCapped
from pgtenant.identity.context import (
    TenantContext,
    TenantIdentity,
    build_context,
    shared_context,
)
from pgtenant.protocol import codec
from pgtenant.protocol.backend import Backend
from pgtenant.protocol.frontend import Frontend
from pgtenant.protocol.inject import Injection, injection
from pgtenant.protocol.ledger import NO_SEGMENTS, Ledger, Segment
from pgtenant.protocol.listen import Listens
from pgtenant.protocol.prepared import PreparedStatements
from pgtenant.protocol.settings import SessionSettings
from pgtenant.protocol.tracker import Link
from pgtenant.session import Session, _Registrar
from pgtenant.stats import LabelStats, TenantStats

from .links import (
    INJECTED,
    ROW,
    ROWDESC,
    Z_I,
    Registrar,
    cc,
    make_link,
    server_sends,
    start,
)

# One of each per logged-in client (LabelStats: per label set, but small and slotted too).
PER_CLIENT = [ClientConnection, Session, _Registrar, Link, Frontend, Backend, Ledger,
              Segment, PreparedStatements, SessionSettings, Injection, Listens, LabelStats,
              TenantStats, PinCapped]


@pytest.mark.parametrize("cls", PER_CLIENT, ids=lambda c: c.__name__)
def test_per_client_classes_have_no_instance_dict(cls: type) -> None:
    # CPython records in a type's __dictoffset__ whether its instances have a __dict__ (0:
    # none). Interpreted, that takes __slots__ on every class of the MRO, without "__dict__";
    # compiled by mypyc (pgtenant/compiled.py), the protocol's classes are native, with a
    # fixed layout and no __slots__ to declare: the offset is the one check true of both.
    missing = [k.__qualname__ for k in cls.__mro__[:-1] if "__slots__" not in vars(k)]
    assert cls.__dictoffset__ == 0, f"{cls.__qualname__}: a __dict__ (no __slots__ in {missing})"


def test_the_instance_dict_check_sees_a_dict() -> None:
    class Slotted:
        __slots__ = ("x",)

    class Loose(Slotted):  # no __slots__ of its own: a __dict__ again
        pass

    class Opened(Slotted):
        __slots__ = ("__dict__",)

    assert Slotted.__dictoffset__ == 0
    assert Loose.__dictoffset__ != 0 and Opened.__dictoffset__ != 0


def test_an_idle_link_holds_no_fifo_before_or_after_a_transaction() -> None:
    link = make_link()
    assert link.pending is NO_SEGMENTS and link._ledger.pending is NO_SEGMENTS
    assert not link.cbuf
    out = start(link, codec.query("SELECT 1"))
    assert out.endswith(b"SELECT 1\x00")
    assert link.pending is not NO_SEGMENTS and len(link.pending) == 1  # its own, in flight
    server_sends(link, INJECTED + ROWDESC + ROW + cc("SELECT 1") + Z_I)
    assert link.can_release
    link.detach()
    assert link.pending is NO_SEGMENTS and not NO_SEGMENTS
    assert not link.cbuf


def test_the_shared_fifo_takes_no_segment() -> None:
    ledger = Ledger()
    ledger.release()
    assert ledger.pending is NO_SEGMENTS
    with pytest.raises(AssertionError):
        ledger.push(Segment(0))
    assert not NO_SEGMENTS
    ledger.reset()  # attached: a FIFO of its own again
    ledger.push(Segment(0))
    assert len(ledger.pending) == 1 and not NO_SEGMENTS


def test_a_released_fifo_is_reused_empty_by_one_ledger_only() -> None:
    # release gives an emptied FIFO to the spares and reset takes one back: no allocation
    # per transaction, and never the shared FIFO nor one that another ledger holds.
    from pgtenant.protocol import ledger as ledger_module

    spare = ledger_module._SPARE
    spare.clear()
    first, second = Ledger(), Ledger()
    first_fifo, second_fifo = first.pending, second.pending
    first.release()
    first.release()  # released twice: the shared FIFO never becomes a spare
    second.release()
    assert spare == [first_fifo, second_fifo] and all(f is not NO_SEGMENTS for f in spare)
    assert first.pending is NO_SEGMENTS and second.pending is NO_SEGMENTS
    first.reset()
    second.reset()
    assert first.pending is second_fifo and second.pending is first_fifo  # reused
    assert not first.pending and not second.pending and not spare
    first.push(Segment(0))
    assert not second.pending and not NO_SEGMENTS
    first.release()  # replies owed: it keeps its FIFO, which is no spare
    assert not spare and len(first.pending) == 1


def test_the_spare_fifos_are_bounded() -> None:
    from pgtenant.protocol import ledger as ledger_module

    spare = ledger_module._SPARE
    spare.clear()
    for _ in range(ledger_module._SPARE_MAX + 5):
        Ledger().release()
    assert len(spare) == ledger_module._SPARE_MAX
    spare.clear()


def test_a_ledger_keeps_its_fifo_while_replies_are_owed() -> None:
    ledger = Ledger()
    ledger.push(Segment(0))
    ledger.release()  # a server dropped mid-request: its segments stay visible
    assert ledger.pending is not NO_SEGMENTS and len(ledger.pending) == 1


def _context(token: uuid.UUID, org: uuid.UUID | None = None, role: str = "tenant_sme"
             ) -> TenantContext:
    identity = TenantIdentity(org_id=org or uuid.UUID(int=7), slug="acme", tenant_type="sme",
                              token_id=token)
    return build_context(identity, TenantTypeConfig(name="sme", role=role,
                                                    search_path=("public",)))


def test_injection_is_shared_only_between_identical_contexts_and_settings() -> None:
    token = uuid.uuid4()
    ctx = _context(token)
    same = _context(token)  # built again at another login: equal, not identical
    assert ctx is not same
    first = injection(ctx, b"k" * 32, (("application_name", "a"),))
    assert injection(same, b"k" * 32, (("application_name", "a"),)) is first
    # Anything that changes the bytes, or what the session reads back, is its own.
    others = [
        injection(ctx, b"k" * 32, (("application_name", "b"),)),
        injection(ctx, b"j" * 32, (("application_name", "a"),)),
        injection(ctx, b"k" * 32, (("application_name", "a"),),
                  set_local=False),
        injection(_context(uuid.uuid4()), b"k" * 32,
                  (("application_name", "a"),)),
        injection(_context(token, uuid.UUID(int=8)), b"k" * 32,
                  (("application_name", "a"),)),
        injection(_context(token, role="other"), b"k" * 32,
                  (("application_name", "a"),)),
    ]
    assert all(o is not first for o in others)
    assert len({id(o) for o in others}) == len(others)
    assert first.managed == frozenset({"application_name"})


def test_contexts_are_shared_only_between_equal_identities_and_types() -> None:
    sme = TenantTypeConfig(name="sme", role="tenant_sme", search_path=("public",))
    token = uuid.uuid4()

    def ident(token_id: uuid.UUID) -> TenantIdentity:
        return TenantIdentity(org_id=uuid.UUID(int=9), slug="acme", tenant_type="sme",
                              token_id=token_id)

    first = shared_context(ident(token), sme)
    assert shared_context(ident(token), sme) is first
    assert first == build_context(ident(token), sme)
    other_token = shared_context(ident(uuid.uuid4()), sme)
    other_type = shared_context(ident(token), TenantTypeConfig(
        name="sme", role="tenant_other", search_path=("public",)))
    assert other_token is not first and other_token.identity.token_id != token
    assert other_type is not first and other_type.role == "tenant_other"
    # The Link's tenant key (which servers need a reset) follows the context, not sharing.
    assert injection(first).tenant_key != injection(other_type).tenant_key
    assert make_link().tenant_key == injection(make_link().injection.context).tenant_key


def test_a_listen_queue_is_no_deque() -> None:
    listens = Listens(b"k" * 32, str(uuid.UUID(int=7)), "sme", Registrar())
    assert isinstance(listens.queue, list) and not listens.queue
    assert listens.enqueue(b"frame")
    assert listens.flush() == b"frame" and not listens.queue
