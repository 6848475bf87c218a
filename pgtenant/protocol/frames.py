"""The one framer: where a protocol message ends, and every frame size limit the proxy has.

Sans-I/O, in the style of asyncpg's ``ReadBuffer.take_message`` and h11's receive buffer:
a caller keeps its own buffer and asks where the frame at ``pos`` ends; nothing is copied.

Two shapes of frame exist on the wire:

* typed (every message after the startup packet, both directions): a type byte, then an
  int32 length that counts itself and the body but not the type byte;
* untyped (the startup packet, SSLRequest, GSSENCRequest, CancelRequest): an int32 length
  that counts itself, then an int32 code.

A length below the frame's minimum (4 for a typed frame: the length alone; 8 for a startup
packet) or above the caller's limit raises ``FrameError`` before any byte of the body is
awaited or kept (untrusted input has bounded cost). The caller turns it into its own
client-visible error; the limits themselves are all here, except ``max_message_size``,
which is configurable and passed in.

The two hot loops (``Frontend.pump``, ``Backend.feed``) inline ``frame_end``: the header is
unpacked with ``unpack_length`` and judged against ``MIN_LENGTH`` and the limit in place,
as a call per frame cost 3-6 % of a transaction (benchmarks/tracker_loop.py);
``tests/unit/test_frames.py`` checks that they refuse exactly what ``frame_end`` refuses.
Everything else calls ``frame_at`` / ``frame_end`` / ``startup_at``.
"""

from __future__ import annotations

import struct
from typing import Final

from ..errors import ClientProtocolError, MessageTooLarge, ProtocolError

__all__ = [
    "ADMIN_LIMIT",
    "HEADER_SIZE",
    "LOGIN_LIMIT",
    "MIN_LENGTH",
    "MIN_PASSWORD",
    "MIN_STARTUP",
    "NO_LIMIT",
    "PASSWORD_LIMIT",
    "STARTUP_HEADER_SIZE",
    "STARTUP_LIMIT",
    "FrameError",
    "client_frame_error",
    "frame_at",
    "frame_end",
    "startup_at",
    "unpack_length",
]

# Bytes needed before a typed frame's length is known: type byte + int32 length.
HEADER_SIZE: Final = 5
# Bytes of an untyped packet's header: int32 length + int32 code.
STARTUP_HEADER_SIZE: Final = 8
# The smallest valid length of a typed frame: the length field alone (Sync, Terminate...).
MIN_LENGTH: Final = 4
# The smallest valid startup packet: the length and the code (SSLRequest is exactly this).
MIN_STARTUP: Final = 8
# The smallest valid PasswordMessage: the length and the password's terminating NUL.
MIN_PASSWORD: Final = 5

# The limits. A client's messages after login are capped by the configurable
# ``max_message_size`` (passed in by the caller); these are the fixed ones.
#: No cap: the server's replies in the data path (a DataRow may be up to 1 GB); every
#: int32 length passes, only a length below the minimum is refused.
NO_LIMIT: Final = 0x7FFF_FFFF
#: A backend's frames during its login (authentication, parameters, key data).
LOGIN_LIMIT: Final = 1 << 24
#: A message to the admin console (SHOW, KILL...: short statements).
ADMIN_LIMIT: Final = 1 << 20
#: A startup packet is small; anything bigger is an attack or a confused client.
STARTUP_LIMIT: Final = 10_000
#: A password message longer than this is no token (JWTs included) but a buffer-stuffer.
PASSWORD_LIMIT: Final = 4096

#: The int32 reader of a frame's length, for the hot loops that inline ``frame_end``.
unpack_length: Final = struct.Struct("!i").unpack_from
_unpack_i32 = unpack_length


class FrameError(ProtocolError):
    """A frame length below its minimum or above its limit (SQLSTATE 08P01).

    ``length`` is the length read from the wire, ``limit`` the cap it was judged against,
    ``msg_type`` the type byte (None for a startup packet); ``too_large`` tells the two
    cases apart, so a caller can word its own error (``MessageTooLarge``...).
    """

    def __init__(self, length: int, limit: int, msg_type: int | None = None):
        what = "startup packet" if msg_type is None else f"message {chr(msg_type)!r}"
        super().__init__(f"invalid length {length} of {what} (limit {limit})")
        self.length = length
        self.limit = limit
        self.msg_type = msg_type
        self.too_large = length > limit


def frame_end(buf: bytes | bytearray, pos: int, limit: int, minimum: int = MIN_LENGTH) -> int:
    """The end of the typed frame whose type byte is at ``pos``; needs HEADER_SIZE bytes there.

    Returns: the offset just past the frame (``pos + 1 + length``), which may lie beyond
    ``len(buf)`` while the frame is still arriving (a caller that streams frames through
    needs it then too).
    Raises: FrameError when the length is below ``minimum`` or above ``limit``.
    """
    length: int
    (length,) = _unpack_i32(buf, pos + 1)
    if length < minimum or length > limit:
        raise FrameError(length, limit, buf[pos])
    return pos + 1 + length


def frame_at(buf: bytes | bytearray, pos: int, limit: int, minimum: int = MIN_LENGTH) -> int:
    """The end of the complete typed frame at ``pos``.

    Returns: the offset just past it, or -1 when the frame (or its header) is incomplete.
    Raises: FrameError as ``frame_end`` (as soon as the header is there).
    """
    if len(buf) - pos < HEADER_SIZE:
        return -1
    end = frame_end(buf, pos, limit, minimum)
    return end if end <= len(buf) else -1


def startup_at(buf: bytes | bytearray, pos: int = 0, limit: int = STARTUP_LIMIT) -> int:
    """The end of the complete untyped packet (startup, SSL/GSSENC or cancel request) at
    ``pos``.

    Returns: the offset just past it, or -1 when the packet (or its length) is incomplete.
    Raises: FrameError (``msg_type`` None) when the length is below MIN_STARTUP or above
    ``limit``.
    """
    if len(buf) - pos < 4:
        return -1
    length: int
    (length,) = _unpack_i32(buf, pos)
    if length < MIN_STARTUP or length > limit:
        raise FrameError(length, limit)
    end = pos + length
    return end if end <= len(buf) else -1


def client_frame_error(exc: FrameError) -> ClientProtocolError:
    """Returns: the client's error for a bad frame length, worded as it always was (the
    client pump's, frontend.py)."""
    t = chr(exc.msg_type or 0)
    if exc.too_large:
        return MessageTooLarge(
            f"message {t!r} of {exc.length} bytes exceeds max_message_size ({exc.limit})")
    return ClientProtocolError(f"invalid length {exc.length} in message {t!r}")
