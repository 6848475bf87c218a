"""A kit for driving a ``Link`` in unit tests: a link of one tenant, the server's replies to
its injected context, and one-call helpers for each direction.

Shared by the tracker's step tests, its truth tests and the fuzzer (tests import helpers from
here, never from one another).
"""

from __future__ import annotations

import uuid

from pgtenant.config import TenantTypeConfig
from pgtenant.identity.context import TenantIdentity, build_context
from pgtenant.protocol import codec
from pgtenant.protocol.inject import Injection
from pgtenant.protocol.tracker import CTX_NONE, HOLD, IDLE, NEED_SERVER, Link

ORG = uuid.UUID("11111111-2222-3333-4444-555555555555")


def make_link() -> Link:
    identity = TenantIdentity(org_id=ORG, slug="acme", tenant_type="sme", token_id=uuid.uuid4())
    ctx = build_context(identity, TenantTypeConfig(name="sme", role="tenant_sme",
                                                   search_path=("public",)))
    return Link(Injection(ctx), max_message_size=1 << 20)


def cc(tag: str) -> bytes:
    return codec.command_complete(tag)


INJECTED = cc("SET") * 6  # the replies to the six SET LOCALs of a simple-query prefix
# The replies to the session form's one ``SELECT set_config(..., false)`` (q_session).
INJECTED_SELECT = (codec.frame(ord("T"), b"\x00\x05") + codec.frame(ord("D"), b"\x00\x00")
                   + cc("SELECT 1"))
ROWDESC = codec.frame(ord("T"), b"\x00\x00")  # zero columns is enough for the tracker
ROW = codec.frame(ord("D"), b"\x00\x01\x00\x00\x00\x011")
Z_I = codec.ready_for_query(b"I")
Z_T = codec.ready_for_query(b"T")
Z_E = codec.ready_for_query(b"E")
PARSE_COMPLETE = codec.frame(ord("1"), b"")
BIND_COMPLETE = codec.frame(ord("2"), b"")
CLOSE_COMPLETE = codec.frame(ord("3"), b"")


def client_sends(link: Link, data: bytes) -> tuple[bytes, bytes, int]:
    link.cbuf += data
    return link.pump_client()


def server_sends(link: Link, data: bytes) -> bytes:
    chunks, _ = link.feed_server(data)
    return b"".join(bytes(c) for c in chunks)


def start(link: Link, data: bytes, ctx_state: int = CTX_NONE) -> bytes:
    """Send ``data`` from a client with no server, attach one, return what reaches it."""
    out, _, outcome = client_sends(link, data)
    assert (out, outcome) == (b"", NEED_SERVER)
    link.attach(ctx_state)
    out, reply, outcome = link.pump_client()
    assert outcome in (IDLE, HOLD) and reply == b""
    return out


class Registrar:
    """The database's listener, as a client's Listens sees it (session._Registrar's part):
    confirms every subscription when ``confirm``, and records each call."""

    def __init__(self, confirm: bool = True):
        self.confirm = confirm
        self.calls: list[tuple[str, ...]] = []

    def subscribe(self, mapped: str, channel: str) -> bool:
        self.calls.append(("subscribe", mapped, channel))
        return self.confirm

    def unsubscribe(self, mapped: str) -> None:
        self.calls.append(("unsubscribe", mapped))

    def notifying(self, mapped: str, payload: bytes) -> None:
        self.calls.append(("notifying", mapped, payload.decode()))

    def not_notified(self, mapped: str, payload: bytes) -> None:
        self.calls.append(("not_notified", mapped, payload.decode()))

    def committed(self, mapped: str, payload: bytes) -> bool:
        self.calls.append(("committed", mapped, payload.decode()))
        return False
