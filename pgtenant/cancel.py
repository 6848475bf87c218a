"""Cancel routing: the table of cancel keys handed to clients, and forwarding a CancelRequest.

Owns the keys (client -> (pid, secret)), passing a request on to the worker that owns the
key, sending it to the right backend, and holding that backend out of the pool until the
cancel settled. It does not decide whether a client has something to cancel: the client
answers that (``Cancellable.cancel_request``), since only it knows what it has in flight.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Protocol

from .server import ServerConnection, send_cancel
from .workers import WorkerInfo, ask_worker

__all__ = ["CancelTable", "Cancellable", "after_cancels", "forward_cancel"]

log = logging.getLogger("pgtenant")

CancelKey = tuple[int, int]


class Cancellable(Protocol):
    """A client that may be named by a CancelRequest."""

    def cancel_request(self) -> ServerConnection | None:
        """Returns: the server to forward the request to, or None (nothing to cancel)."""
        ...


class CancelTable:
    """The cancel keys of this process's clients (with workers, of this worker's)."""

    def __init__(self, worker: WorkerInfo | None = None):
        self.worker = worker
        self._keys: dict[CancelKey, Cancellable] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def register(self, client: Cancellable) -> CancelKey:
        """Returns: a fresh (pid, secret) pair the client will present to cancel (with
        workers, ``pid % count`` is this worker's index, so any worker can route it)."""
        while True:
            pid = secrets.randbits(31)
            if self.worker is not None:
                count = self.worker.count
                pid = pid - pid % count + self.worker.index
                if pid >= 1 << 31:
                    continue
            key = (pid, secrets.randbits(31) - (1 << 30))
            if key not in self._keys:
                self._keys[key] = client
                return key

    def forget(self, key: CancelKey | None) -> None:
        """The client of ``key`` is gone; idempotent."""
        if key is not None:
            self._keys.pop(key, None)

    def cancel(self, pid: int, secret: int) -> None:
        """Forward a CancelRequest to the backend the client is using right now, if any."""
        worker = self.worker
        if worker is not None and pid % worker.count != worker.index:
            # The kernel gave this CancelRequest to another worker than its client's.
            target = pid % worker.count
            log.info("cancel request passed to worker %d", target)
            passed = asyncio.ensure_future(
                ask_worker(worker.socket(target), f"cancel {pid} {secret}"))
            passed.add_done_callback(lambda t: t.cancelled() or t.exception())
            return
        client = self._keys.get((pid, secret))
        # Unknown key, or nothing of this client's is running on a server: Postgres also
        # ignores such requests. The client names a server only while its own request is in
        # flight there, so a cancel can never reach the next client's query.
        server = client.cancel_request() if client is not None else None
        if server is not None:
            forward_cancel(server)


def forward_cancel(server: ServerConnection) -> None:
    """Send a CancelRequest for ``server``'s backend; counted in ``cancels_in_flight`` until
    Postgres closed the cancel connection (see ``after_cancels``)."""
    login = server.login
    if login is None:
        return
    server.cancels_in_flight += 1
    task = asyncio.ensure_future(
        send_cancel(server.dsn, login.backend_pid, login.backend_secret)
    )

    def settled(done: asyncio.Future[None]) -> None:
        if not done.cancelled():
            done.exception()
        server.cancels_in_flight -= 1
        if not server.cancels_in_flight and server.on_cancels_settled is not None:
            give_back, server.on_cancels_settled = server.on_cancels_settled, None
            give_back()

    task.add_done_callback(settled)


def after_cancels(server: ServerConnection,
                  give_back: Callable[[ServerConnection], None]) -> None:
    """Give ``server`` back to its pool, once no CancelRequest for it is in flight.

    A CancelRequest reaches the backend as a signal some time after it was sent; were the
    server handed to another client before that, the signal could cancel that client's
    query. It waits until Postgres closed the cancel connection (it has then signalled the
    backend, which, idle, ignores it): ``forward_cancel`` counts and settles them.
    """
    if not server.cancels_in_flight:
        give_back(server)
        return
    server.peer = None  # nobody's until then

    def settled() -> None:
        give_back(server)

    server.on_cancels_settled = settled
