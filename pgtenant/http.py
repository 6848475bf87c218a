"""The operator's HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz`` (issue #5).

Served on the proxy's own event loop, so the metrics collector reads the pools and clients
without locks. h11 does the HTTP/1.1 parsing; each request is answered from memory, so a
handler never awaits anything but the socket.

- ``/metrics``: Prometheus text exposition of the App's registry.
- ``/healthz``: 200 while the process serves its event loop (liveness).
- ``/readyz``: 200 when the proxy accepts clients and every database has been verified
  (lockdown, signing key) and is not paused; 503 with the reasons otherwise (readiness).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import h11
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["HttpEndpoint"]

log = logging.getLogger("pgtenant.http")
_MAX_REQUEST = 16 * 1024
_TIMEOUT = 10.0


class HttpEndpoint:
    """A tiny HTTP/1.1 server for the three operator paths."""

    def __init__(self, metrics: Callable[[], Awaitable[bytes]],
                 readiness: Callable[[], Awaitable[list[str]]]):
        self.metrics = metrics  # renders the exposition text
        self.readiness = readiness  # returns the reasons the proxy is not ready, if any
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, method: bytes, target: bytes) -> tuple[int, bytes, bytes]:
        """Returns: (status, content type, body) for one request."""
        path = target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, b"text/plain", b"method not allowed\n"
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST.encode(), await self.metrics()
        if path == b"/healthz":
            return 200, b"text/plain", b"ok\n"
        if path == b"/readyz":
            problems = await self.readiness()
            if problems:
                return 503, b"text/plain", ("\n".join(problems) + "\n").encode()
            return 200, b"text/plain", b"ready\n"
        return 404, b"text/plain", b"not found: try /metrics, /healthz or /readyz\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await asyncio.wait_for(reader.read(65536), _TIMEOUT))
                elif isinstance(event, h11.Request):
                    status, ctype, body = await self._answer(event.method, event.target)
                    headers = [(b"content-type", ctype),
                               (b"content-length", str(len(body)).encode())]
                    out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
                    if event.method != b"HEAD":
                        out += conn.send(h11.Data(data=body)) or b""
                    out += conn.send(h11.EndOfMessage()) or b""
                    writer.write(out)
                    await writer.drain()
                elif event is h11.PAUSED:  # one request answered: keep-alive or close
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        break
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    break
                # Data / EndOfMessage of a request: nothing to do (bodies are ignored).
        except (h11.RemoteProtocolError, TimeoutError, ConnectionError):
            pass  # a bad or idle scraper: just close
        except Exception:  # never let the endpoint take the proxy down
            log.exception("error serving an HTTP request")
        finally:
            writer.close()
