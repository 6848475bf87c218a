"""Sans-I/O PostgreSQL protocol 3.0 core: framing, codecs, handshakes and the link tracker.

Nothing in this package touches sockets, asyncio, clocks or logging; bytes go in, frames,
decisions and bytes come out. A test enforces that it imports nothing that does I/O.
"""
