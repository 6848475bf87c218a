"""The extended-batch fast paths (issue 16, lever 2) against the general path they shortcut.

Two links see the same client bytes and the same server replies: one through ``pump`` (the
fast path for one complete common batch, extended.py ``one_batch``) and the fast drop of the
injected replies (``Injection.ext_reply``, backend.py ``_injection_dropped``), the other
through ``pump_frames`` (the general loop only) with ``ext_reply`` emptied (so its injected
replies are matched one by one). Everything each sends to the server and to the client, and
the state it ends in, must be identical, batch after batch, including errors, stale plans
healed by a replay, transaction blocks, refusals and replies cut across reads.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgtenant.config import TenantTypeConfig
from pgtenant.errors import ProxyError
from pgtenant.identity.context import TenantIdentity, build_context
from pgtenant.protocol import codec
from pgtenant.protocol.constants import TXN_IDLE
from pgtenant.protocol.freshness import Freshness
from pgtenant.protocol.inject import SET_COMPLETE, Injection
from pgtenant.protocol.listen import Listens
from pgtenant.protocol.tracker import CTX_NONE, IDLE, NEED_SERVER, Link

from .links import Registrar

_ORG = uuid.UUID("11111111-2222-3333-4444-555555555555")
_SELECT_P = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
_ROWDESC = codec.row_description([("abalance", False)])
_ROW = codec.data_row([0])


def _guard(sql: bytes) -> str | None:
    return "refused by the test guard" if b"forbidden" in sql else None


def _injection(settings: tuple[tuple[str, str], ...] = (("application_name", "t"),)
               ) -> Injection:
    identity = TenantIdentity(org_id=_ORG, slug="acme", tenant_type="sme",
                              token_id=uuid.UUID(int=7))
    ctx = build_context(identity, TenantTypeConfig(name="sme", role="tenant_sme",
                                                   search_path=("public",)))
    return Injection(ctx, None, settings, set_local=True)


def _ctx_row(inj: Injection) -> bytes:
    """What Postgres answers to the Execute of the context statement (inject.CTX_SQL)."""
    ctx = inj.context
    tenant_id, tenant_type, entity_id = (v for _, v in ctx.gucs)
    return codec.data_row([tenant_id, tenant_type, entity_id, inj.signature,
                           len(inj.settings), ctx.search_path_value, ctx.role])


def _error(code: str) -> bytes:
    return codec.frame(ord("E"), b"SERROR\x00VERROR\x00C" + code.encode()
                       + b"\x00Mtest error\x00\x00")


class _Server:
    """A small reply model of Postgres: transaction status, errors, a plan change once."""

    def __init__(self) -> None:
        self.ctx_state = CTX_NONE
        self.prepared: OrderedDict[bytes, int] = OrderedDict()
        self.encoding = "UTF8"
        self.status = b"I"
        self.stale_once = True  # the first Bind with the parameter b"stale" fails 0A000

    def replies(self, inj: Injection, sent: bytes) -> bytes:
        out = bytearray()
        pos = 0
        skipping = False  # after an error, Postgres skips to the Sync
        ctx_portal = False
        portal_sql = b""
        unnamed_sql = b""
        while pos < len(sent):
            t = sent[pos]
            length = int.from_bytes(sent[pos + 1:pos + 5], "big")
            body = sent[pos + 5:pos + 1 + length]
            pos += 1 + length
            if t == ord("S"):
                skipping = False
                out += codec.ready_for_query(self.status)
                continue
            if skipping:
                continue
            if t == ord("Q"):
                text = body[:-1]
                if text.startswith(inj.q_prefix):
                    out += SET_COMPLETE * inj.q_drop
                out += _ROWDESC + _ROW + codec.command_complete("SELECT 1")
                out += codec.ready_for_query(self.status)
            elif t == ord("P"):
                name, sql = body.split(b"\x00")[:2]
                if b"boom" in sql:
                    out += _error("42601")
                    skipping = True
                    self._failed()
                    continue
                if not name:
                    unnamed_sql = sql
                out += codec.frame(ord("1"), b"")
            elif t == ord("B"):
                _portal, stmt, rest = body.split(b"\x00", 2)
                ctx_portal = stmt.startswith(b"__pgtenant_ctx_")
                portal_sql = unnamed_sql if not stmt else b""
                if b"stale" in rest and self.stale_once and not ctx_portal:
                    self.stale_once = False
                    out += _error("0A000")
                    skipping = True
                    self._failed()
                    continue
                if b"bad" in rest:
                    out += _error("22P02")
                    skipping = True
                    self._failed()
                    continue
                out += codec.frame(ord("2"), b"")
            elif t == ord("D"):
                if body[:1] == b"S":
                    out += codec.frame(ord("t"), b"\x00\x01\x00\x00\x00\x17")
                out += _ROWDESC
            elif t == ord("E"):
                if ctx_portal:
                    out += _ctx_row(inj) + codec.command_complete("SELECT 1")
                elif portal_sql.upper().startswith(b"BEGIN"):
                    self.status = b"T"
                    out += codec.command_complete("BEGIN")
                elif portal_sql.upper().startswith(b"COMMIT"):
                    self.status = b"I"
                    out += codec.command_complete("COMMIT")
                else:
                    out += _ROW + codec.command_complete("SELECT 1")
            elif t == ord("C"):
                out += codec.frame(ord("3"), b"")
            elif t == ord("H"):
                pass
        return bytes(out)

    def _failed(self) -> None:
        if self.status == b"T":
            self.status = b"E"


def _link(*, reference: bool, listens: bool = False) -> Link:
    inj = _injection()
    if reference:
        inj.ext_reply = b""  # the injected replies matched one by one
    link = Link(inj, max_message_size=1 << 20, guard=_guard)
    link._stmts._fresh = Freshness()  # each link its own generations (no shared counter)
    if listens:  # LISTEN/NOTIFY allowed (a database with a listener): the hooks run too
        link.listens = Listens(b"k" * 32, str(_ORG), "sme", Registrar())
    return link


def _state(link: Link) -> tuple[object, ...]:
    stmts = link._stmts
    listens = link.listens
    heard = ((dict(listens.channels), dict(listens.portal_ops), dict(listens.stmt_ops),
              listens.waiting, listens.deferred) if listens is not None else None)
    return (heard, link.attached, link.can_release, link.status, len(link.pending),
            link.open_extended, link._front.skip_to_sync, link.refused, link.pinned,
            link.session_dirty, dict(stmts.client), dict(stmts.portal_flags),
            dict(stmts.stmt_flags), stmts.unnamed, stmts.unnamed_here, stmts.ctx_state,
            dict(stmts.server), stmts.quiet_parses, bytes(link.cbuf))


def _pump(link: Link, reference: bool) -> tuple[bytes, bytes, object]:
    return link._front.pump_frames() if reference else link.pump_client()


def _run(batches: list[bytes], cuts: list[int], listens: bool = False) -> None:
    """Drive both links through ``batches``; every output and the final states must match."""
    links = {False: _link(reference=False, listens=listens),
             True: _link(reference=True, listens=listens)}
    servers = {False: _Server(), True: _Server()}
    for i, batch in enumerate(batches):
        traces: dict[bool, list[object]] = {}
        for ref, link in links.items():
            srv = servers[ref]
            trace: list[object] = []
            traces[ref] = trace
            link.cbuf += batch
            try:
                for _ in range(4):
                    to_server, to_client, outcome = _pump(link, ref)
                    if outcome == NEED_SERVER:
                        link.attach(srv.ctx_state, srv.prepared, srv.encoding)
                        more, more_client, outcome = _pump(link, ref)
                        to_server += more
                        to_client += more_client
                    trace.append((to_server, to_client, int(outcome)))
                    if not to_server:
                        break
                    reply = srv.replies(link.injection, to_server)
                    cut = cuts[i % len(cuts)] % (len(reply) + 1)
                    # Cut in two reads. Where a frame cut by the read goes out (now, as a
                    # passed-through run, or with the next read) may differ: the bytes the
                    # client gets, in order, may not.
                    resume = False
                    to_client = b""
                    for part in (reply[:cut], reply[cut:]):
                        chunks, more_resume = link.feed_server(part)
                        resume = resume or more_resume
                        to_client += b"".join(bytes(c) for c in chunks)
                    trace.append((to_client, resume))
                    if link.can_release and not link.pinned:
                        srv.encoding = link.server_encoding
                        srv.ctx_state = link.detach()
                        srv.status = b"I"
                    if not resume:
                        break
            except ProxyError as exc:
                trace.append(("raised", type(exc).__name__, str(exc)))
            trace.append(_state(link))
        assert traces[False] == traces[True], (i, batch)


# ---------------------------------------------------------------------- the batches

_TEXTS = [_SELECT_P, "select 1", "  SELECT $1::int", "/* c */ SELECT 1", "BEGIN", "COMMIT",
          "SET work_mem = '64kB'", "DEALLOCATE ALL", "SELECT boom", "SELECT forbidden",
          "LISTEN x", "NOTIFY x", "CREATE TABLE t (a int)", "SELECT 'é'"]


def _describe_p(portal: str = "") -> bytes:
    return codec.frame(ord("D"), b"P" + portal.encode() + b"\x00")


def _unnamed(text: str, param: bytes, *, describe: bool = True, portal: str = "",
             max_rows: int = 0) -> bytes:
    return (codec.parse("", text) + codec.bind(portal, "", [param])
            + (_describe_p(portal) if describe else b"") + codec.execute(portal, max_rows)
            + codec.sync())


def _named(stmt: str, param: bytes, *, describe: bool = True, portal: str = "") -> bytes:
    return (codec.bind(portal, stmt, [param]) + (_describe_p(portal) if describe else b"")
            + codec.execute(portal) + codec.sync())


_params = st.sampled_from([b"1", b"42", b"bad", b"stale"])
_batch = st.one_of(
    st.builds(_unnamed, st.sampled_from(_TEXTS), _params, describe=st.booleans(),
              portal=st.sampled_from(["", "", "p1"]), max_rows=st.sampled_from([0, 0, 5])),
    st.builds(_named, st.sampled_from(["s1", "s1", "s2", "nope"]), _params,
              describe=st.booleans(), portal=st.sampled_from(["", "", "p1"])),
    st.builds(lambda n, t: codec.parse(n, t) + codec.sync(), st.sampled_from(["s1", "s2"]),
              st.sampled_from(_TEXTS)),
    st.builds(lambda n: codec.frame(ord("C"), b"S" + n.encode() + b"\x00") + codec.sync(),
              st.sampled_from(["s1", "s2"])),
    st.just(codec.query("SELECT 1")),
    st.just(codec.bind("", "", [b"1"]) + codec.execute() + codec.sync()),
    # A batch cut in two (its Sync comes later), and a Flush in the middle.
    st.builds(lambda p: _unnamed(_SELECT_P, p)[:-5], _params),
    st.just(codec.sync()),
    st.builds(lambda p: codec.parse("", _SELECT_P) + codec.frame(ord("H"), b"")
              + codec.bind("", "", [p]) + codec.execute() + codec.sync(), _params),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_batch, min_size=1, max_size=12),
       st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=4),
       st.booleans())
def test_fast_paths_send_and_answer_exactly_what_the_general_path_does(
        batches: list[bytes], cuts: list[int], listens: bool) -> None:
    _run([codec.parse("s1", _SELECT_P) + codec.sync(), *batches], cuts, listens)


# ---------------------------------------------------------------------- examples


def _sent(link: Link, srv: _Server, batch: bytes) -> tuple[bytes, list[bytes]]:
    """One transaction through ``link`` (fast paths on). Returns: (to server, to client)."""
    link.cbuf += batch
    to_server, _, outcome = link.pump_client()
    if outcome == NEED_SERVER:
        link.attach(srv.ctx_state, srv.prepared, srv.encoding)
        more, _, outcome = link.pump_client()
        to_server += more
    assert outcome == IDLE
    chunks, _ = link.feed_server(srv.replies(link.injection, to_server))
    assert link.can_release
    srv.ctx_state = link.detach()
    return to_server, [bytes(c) for c in chunks]


@pytest.mark.parametrize("batch", [
    _unnamed(_SELECT_P, b"1"), _unnamed(_SELECT_P, b"1", describe=False), _named("s1", b"7"),
    _named("s1", b"7", describe=False)])
def test_common_batches_take_the_fast_path(batch: bytes) -> None:
    link, srv = _link(reference=False), _Server()
    _sent(link, srv, codec.parse("s1", _SELECT_P) + codec.sync())
    link.cbuf += batch
    to_server, _, outcome = link.pump_client()
    assert outcome == NEED_SERVER and not to_server  # judged only once a server is there
    link.attach(srv.ctx_state, srv.prepared, srv.encoding)
    front = link._front
    # The general loop would leave the frames it handled in cbuf's place; the fast path
    # empties cbuf in one step and leaves the segment synced.
    to_server, _, outcome = front.one_batch() or (b"", b"", None)
    assert outcome == IDLE and to_server.startswith(link.injection.ext_bind)
    assert not link.cbuf and link.pending[-1].synced


@pytest.mark.parametrize("batch", [
    _unnamed(_SELECT_P, b"1", portal="p1"),  # a named portal
    _unnamed("BEGIN", b"1"),  # a statement with a flag (transaction control)
    _unnamed("SELECT forbidden", b"1"),  # refused by the guard
    _unnamed("SET work_mem = 1", b"1"),  # a session command local.py may answer
    _unnamed(_SELECT_P, b"1") + codec.query("SELECT 1"),  # more than one batch
    _unnamed(_SELECT_P, b"1")[:-5],  # no Sync yet
    _named("nope", b"1"),  # a statement the client never prepared
    codec.parse("s3", _SELECT_P) + codec.bind("", "s3", [b"1"]) + codec.execute()
    + codec.sync(),  # a named Parse in the batch
])
def test_anything_unusual_falls_back_to_the_general_path(batch: bytes) -> None:
    link, srv = _link(reference=False), _Server()
    _sent(link, srv, codec.parse("s1", _SELECT_P) + codec.sync())
    link.attach(srv.ctx_state, srv.prepared, srv.encoding)
    link.cbuf += batch
    before = _state(link)
    assert link._front.one_batch() is None
    assert _state(link) == before  # nothing changed: the general path decides it all


def test_injected_replies_are_dropped_with_one_comparison_in_steady_state() -> None:
    link, srv = _link(reference=False), _Server()
    _sent(link, srv, codec.parse("s1", _SELECT_P) + codec.sync())
    _sent(link, srv, _unnamed(_SELECT_P, b"1"))  # the context statement is parsed
    assert srv.ctx_state != CTX_NONE
    _, chunks = _sent(link, srv, _unnamed(_SELECT_P, b"2"))
    # The client gets its own replies only: ParseComplete first, no BindComplete of ours.
    assert b"".join(chunks).startswith(codec.frame(ord("1"), b"") + codec.frame(ord("2"), b""))
    assert link.injection.ext_reply[5:-5] == _ctx_row(link.injection) + \
        codec.command_complete("SELECT 1")
    assert link.status == TXN_IDLE


def test_a_stale_plan_on_the_fast_path_is_still_healed() -> None:
    """A Bind of a named statement that fails with 0A000 (plan changed) is replayed once,
    as on the general path: the replay is recorded by the fast path too."""
    link, srv = _link(reference=False), _Server()
    _sent(link, srv, codec.parse("s1", _SELECT_P) + codec.sync())
    _sent(link, srv, _unnamed(_SELECT_P, b"1"))
    link.cbuf += _named("s1", b"stale")
    link.pump_client()  # NEED_SERVER
    link.attach(srv.ctx_state, srv.prepared, srv.encoding)
    to_server, _, outcome = link.pump_client()
    assert outcome == IDLE
    assert link.pending[-1].replay is not None and link.pending[-1].replay.complete
    chunks, resume = link.feed_server(srv.replies(link.injection, to_server))
    assert resume and not b"".join(bytes(c) for c in chunks)  # error and Z hidden
