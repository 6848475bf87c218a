"""In-process cost of the link tracker per transaction: no sockets, no event loop.

Drives one ``Link`` the way ``pgtenant/client.py`` does (pump the client's bytes, attach a
server on NEED_SERVER, pump again, feed the server's replies, release when
``can_release``), with two realistic transactions:

* ``simple``: a ``pgbench -S`` transaction, one Query (a different ``aid`` each time, as
  pgbench sends) answered RowDescription/DataRow/CommandComplete/ReadyForQuery, behind the
  injected context prefix whose replies the tracker drops;
* ``extended``: Parse/Bind/Describe/Execute of the unnamed statement, then Bind/Describe/
  Execute of a named one prepared earlier (pgbench -M prepared's shape), and Sync, behind the
  extended-protocol context injection;
* ``unnamed``: ``pgbench -M extended``'s batch, Parse/Bind/Describe/Execute/Sync of "";
* ``prepared``: ``pgbench -M prepared``'s batch, Bind/Describe/Execute/Sync of a named one.

The server's replies are computed once from what the tracker sent (a small reply model of
Postgres) and then replayed as fixed bytes, so the loop times the tracker only.

Usage: ``python -m benchmarks.tracker_loop [-n ITERATIONS] [--repeat 5] [--cases a,b]
[--calls]``; prints
which protocol core runs (``PGTENANT_PURE=1`` for the pure one) and µs per transaction,
best of ``--repeat`` runs, for each transaction.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import struct
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

from pgtenant import build_kind
from pgtenant.config import TenantTypeConfig
from pgtenant.identity.context import TenantIdentity, build_context
from pgtenant.protocol import codec
from pgtenant.protocol.inject import Injection
from pgtenant.protocol.tracker import CTX_NONE, IDLE, NEED_SERVER, Link

__all__ = ["main"]

_ORG = uuid.UUID("11111111-2222-3333-4444-555555555555")
_unpack_i32 = struct.Struct("!i").unpack_from
_SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"
_SELECT_P = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
_ROWDESC = codec.row_description([("abalance", False)])
_ROW = codec.data_row([0])
_Z_I = codec.ready_for_query(b"I")


class _Server:
    """What ``ServerConnection`` keeps across clients: its statements and context state."""

    def __init__(self) -> None:
        self.ctx_state = CTX_NONE
        # name -> the generation it was prepared at (protocol/freshness.py)
        self.prepared: OrderedDict[bytes, int] = OrderedDict()
        self.client_encoding = "UTF8"


def _make_link() -> Link:
    identity = TenantIdentity(org_id=_ORG, slug="acme", tenant_type="sme",
                              token_id=uuid.uuid4())
    ctx = build_context(identity, TenantTypeConfig(name="sme", role="tenant_sme",
                                                   search_path=("public",)))
    return Link(Injection(ctx, None, (("application_name", "pgbench"),), set_local=True),
                max_message_size=1 << 20, guard=lambda sql: None)


def _ctx_row(link: Link) -> bytes:
    """The row Postgres answers to the Execute of the context statement (inject.CTX_SQL):
    each ``set_config`` gives back the value it set, and the count of the client's settings."""
    inj = link.injection
    ctx = inj.context
    tenant_id, tenant_type, entity_id = (v for _, v in ctx.gucs)
    return codec.data_row([tenant_id, tenant_type, entity_id, inj.signature,
                           len(inj.settings), ctx.search_path_value, ctx.role])


def _replies(link: Link, sent: bytes) -> bytes:
    """What Postgres answers to ``sent`` (one successful round; rows of one int, the
    context statement's row as Postgres sends it)."""
    out = bytearray()
    ctx_portal = False
    pos = 0
    while pos < len(sent):
        t = sent[pos]
        (length,) = _unpack_i32(sent, pos + 1)
        body = sent[pos + 5: pos + 1 + length]
        pos += 1 + length
        if t == ord("Q"):
            out += link.injection.q_reply + _ROWDESC + _ROW + codec.command_complete("SELECT 1")
            out += _Z_I
        elif t == ord("P"):
            out += codec.frame(ord("1"), b"")
        elif t == ord("B"):
            out += codec.frame(ord("2"), b"")
            ctx_portal = body.split(b"\x00", 2)[1].startswith(b"__pgtenant_ctx_")
        elif t == ord("D"):
            if body[:1] == b"S":
                out += codec.frame(ord("t"), b"\x00\x01\x00\x00\x00\x17")
            out += _ROWDESC
        elif t == ord("E"):
            out += (_ctx_row(link) if ctx_portal else _ROW) + codec.command_complete("SELECT 1")
        elif t == ord("C"):
            out += codec.frame(ord("3"), b"")
        elif t == ord("S"):
            out += _Z_I
    return bytes(out)


def _transaction(link: Link, server: _Server, client: bytes, reply: bytes | None) -> bytes:
    """One transaction as client.py runs it. Returns: what was sent to the server."""
    link.cbuf += client
    to_server, _, outcome = link.pump_client()
    if outcome == NEED_SERVER:
        link.attach(server.ctx_state, server.prepared, server.client_encoding)
        more, _, outcome = link.pump_client()
        to_server += more
    assert outcome == IDLE, outcome
    if reply is None:
        reply = _replies(link, to_server)
    link.feed_server(reply)
    assert link.can_release and not link.pinned
    server.client_encoding = link.server_encoding
    server.ctx_state = link.detach()
    return to_server


def _timed(link: Link, server: _Server, inputs: list[bytes], reply: bytes
           ) -> Callable[[int], float]:
    """Returns: a loop of ``n`` transactions over ``inputs`` (each answered by ``reply``),
    giving the CPU seconds they took."""
    size = len(inputs)

    def run(n: int) -> float:
        step = _transaction
        t0 = time.process_time()
        for i in range(n):
            step(link, server, inputs[i % size], reply)
        return time.process_time() - t0
    return run


def _simple_case() -> Callable[[int], float]:
    link, server = _make_link(), _Server()
    queries = [codec.query(_SELECT.format(aid)) for aid in range(1, 1001)]
    sent = _transaction(link, server, queries[0], None)
    return _timed(link, server, queries, _replies(link, sent))


def _extended_case() -> Callable[[int], float]:
    """The mixed batch: the unnamed statement, then the named ``s1``, in one Sync."""
    return _batch_case([
        codec.parse("", _SELECT_P) + codec.bind("", "", [str(aid).encode()])
        + codec.frame(ord("D"), b"P\x00") + codec.execute()
        + codec.bind("", "s1", [str(aid).encode()])
        + codec.frame(ord("D"), b"P\x00") + codec.execute() + codec.sync()
        for aid in range(1, 1001)
    ])


def _batch_case(batches: list[bytes]) -> Callable[[int], float]:
    """One shape of extended batch, steady state (the named statement ``s1`` prepared)."""
    link, server = _make_link(), _Server()
    # Once per client: the named statement is prepared (pgbench -M prepared does it first).
    _transaction(link, server, codec.parse("s1", _SELECT_P) + codec.sync(), None)
    sent = _transaction(link, server, batches[0], None)
    reply = _replies(link, sent)
    # Steady state: what reaches the server is the same every time (modulo the aid).
    again = _transaction(link, server, batches[0], None)
    assert again == sent, (again, sent)
    return _timed(link, server, batches, reply)


def _unnamed_case() -> Callable[[int], float]:
    """``pgbench -S -M extended``: Parse/Bind/Describe/Execute/Sync of the unnamed statement."""
    return _batch_case([
        codec.parse("", _SELECT_P) + codec.bind("", "", [str(aid).encode()])
        + codec.frame(ord("D"), b"P\x00") + codec.execute() + codec.sync()
        for aid in range(1, 1001)])


def _prepared_case() -> Callable[[int], float]:
    """``pgbench -S -M prepared``: Bind/Describe/Execute/Sync of a named statement."""
    return _batch_case([
        codec.bind("", "s1", [str(aid).encode()])
        + codec.frame(ord("D"), b"P\x00") + codec.execute() + codec.sync()
        for aid in range(1, 1001)])


_CASES: dict[str, Callable[[], Callable[[int], float]]] = {
    "simple": _simple_case, "extended": _extended_case, "unnamed": _unnamed_case,
    "prepared": _prepared_case}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="transactions per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best one counts")
    parser.add_argument("--cases", default=",".join(_CASES),
                        help="comma-separated: " + ", ".join(_CASES))
    parser.add_argument("--calls", action="store_true",
                        help="print Python-level calls per transaction (cProfile; use the "
                             "pure core, PGTENANT_PURE=1, to see the protocol's own calls)")
    args = parser.parse_args(argv)
    # Compiled or pure (PGTENANT_PURE=1) makes a 2x difference: say which one was timed.
    print(f"protocol core: {build_kind()}")
    for name in args.cases.split(","):
        run = _CASES[name]()
        run(min(args.n, 2000))  # warm caches
        if args.calls:
            profile = cProfile.Profile()
            profile.enable()
            run(args.n)
            profile.disable()
            stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
            calls = sum(entry[1] for entry in stats.values())
            print(f"{name:9s} {calls / args.n:7.1f} calls/transaction (cProfile, builtins "
                  f"included, {args.n} transactions)")
            continue
        best = min(run(args.n) for _ in range(args.repeat))
        print(f"{name:9s} {best / args.n * 1e6:7.2f} µs/transaction "
              f"(best of {args.repeat} x {args.n})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
