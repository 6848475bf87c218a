"""The one framer (``pgtenant/protocol/frames.py``): complete, incomplete at every byte, lengths
below the minimum or above the limit, the untyped startup packet; and the hot loops that
inline it (frontend pump, backend feed) agree with it."""

from __future__ import annotations

import struct

import pytest

from pgtenant.errors import (
    ClientProtocolError,
    MessageTooLarge,
    ProtocolError,
    ProxyError,
    ServerProtocolError,
)
from pgtenant.protocol import codec
from pgtenant.protocol.frames import (
    HEADER_SIZE,
    MIN_LENGTH,
    MIN_PASSWORD,
    MIN_STARTUP,
    NO_LIMIT,
    STARTUP_LIMIT,
    FrameError,
    frame_at,
    frame_end,
    startup_at,
)
from pgtenant.protocol.tracker import CTX_NONE

from .test_tracker import client_sends, make_link, server_sends

LIMIT = 1 << 20
SYNC = codec.sync()
QUERY = codec.query("SELECT 1")
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
STARTUP = codec.startup_message([("user", "acme"), ("database", "app")])


def header(t: bytes, length: int) -> bytes:
    return t + struct.pack("!i", length)


# ---------------------------------------------------------------------- typed frames


@pytest.mark.parametrize("frame", [SYNC, QUERY, codec.frame(ord("d"), b"x" * 300)])
def test_a_complete_frame_ends_after_its_length(frame: bytes) -> None:
    assert frame_at(frame, 0, LIMIT) == len(frame)
    assert frame_end(frame, 0, LIMIT) == len(frame)
    assert frame_at(frame + b"Q\x00", 0, LIMIT) == len(frame)  # what follows is not its


def test_frames_are_found_at_any_offset() -> None:
    buf = SYNC + QUERY + SYNC
    ends = []
    pos = 0
    while (end := frame_at(buf, pos, LIMIT)) >= 0:
        ends.append(end)
        pos = end
    assert ends == [5, 5 + len(QUERY), len(buf)]
    assert frame_at(bytearray(buf), len(SYNC), LIMIT) == len(SYNC) + len(QUERY)


@pytest.mark.parametrize("frame", [SYNC, QUERY])
def test_an_incomplete_frame_is_minus_one_at_every_byte(frame: bytes) -> None:
    for cut in range(len(frame)):
        assert frame_at(frame[:cut], 0, LIMIT) == -1, cut
        assert frame_at(b"junk" + frame[:cut], 4, LIMIT) == -1, cut


def test_frame_end_tells_where_an_incomplete_frame_will_end() -> None:
    assert frame_end(QUERY[:HEADER_SIZE], 0, LIMIT) == len(QUERY)


@pytest.mark.parametrize("length", [-(1 << 31), -1, 0, 1, 3])
def test_a_length_below_four_is_refused(length: int) -> None:
    with pytest.raises(FrameError) as info:
        frame_at(header(b"Q", length), 0, LIMIT)
    err = info.value
    assert (err.length, err.limit, err.msg_type, err.too_large) == (length, LIMIT, ord("Q"), False)
    assert isinstance(err, ProtocolError) and isinstance(err, ProxyError)
    assert err.sqlstate == "08P01"


def test_length_four_is_the_smallest_frame() -> None:
    assert MIN_LENGTH == 4
    assert frame_at(header(b"S", 4), 0, LIMIT) == 5


@pytest.mark.parametrize("length", [LIMIT + 1, NO_LIMIT])
def test_a_length_over_the_limit_is_refused_before_the_body(length: int) -> None:
    with pytest.raises(FrameError) as info:
        frame_at(header(b"P", length), 0, LIMIT)  # only the header: refused at once
    assert info.value.too_large and info.value.length == length
    assert info.value.sqlstate == "08P01"


def test_a_length_at_the_limit_is_accepted() -> None:
    assert frame_end(header(b"d", LIMIT), 0, LIMIT) == 1 + LIMIT
    assert frame_at(header(b"d", LIMIT), 0, LIMIT) == -1  # incomplete, not refused


def test_no_limit_takes_every_int32_length() -> None:
    assert frame_end(header(b"D", NO_LIMIT), 0, NO_LIMIT) == 1 + NO_LIMIT


def test_a_minimum_above_four_is_the_callers_choice() -> None:
    with pytest.raises(FrameError):
        frame_at(header(b"p", 4), 0, 4096, MIN_PASSWORD)
    assert frame_at(codec.frame(ord("p"), b"\x00"), 0, 4096, MIN_PASSWORD) == 6


# ---------------------------------------------------------------------- startup packet


@pytest.mark.parametrize("packet", [SSL_REQUEST, STARTUP])
def test_a_complete_startup_packet_ends_after_its_length(packet: bytes) -> None:
    assert startup_at(packet) == len(packet)
    assert startup_at(packet + b"more") == len(packet)
    assert startup_at(b"xx" + packet, 2) == 2 + len(packet)


@pytest.mark.parametrize("packet", [SSL_REQUEST, STARTUP])
def test_an_incomplete_startup_packet_is_minus_one_at_every_byte(packet: bytes) -> None:
    for cut in range(len(packet)):
        assert startup_at(packet[:cut]) == -1, cut


@pytest.mark.parametrize("length", [-1, 0, 4, MIN_STARTUP - 1, STARTUP_LIMIT + 1, NO_LIMIT])
def test_a_startup_length_out_of_range_is_refused(length: int) -> None:
    with pytest.raises(FrameError) as info:
        startup_at(struct.pack("!i", length))
    err = info.value
    assert (err.length, err.msg_type, err.too_large) == (length, None, length > STARTUP_LIMIT)
    assert err.sqlstate == "08P01"


def test_startup_limits_are_the_framers() -> None:
    assert startup_at(struct.pack("!ii", STARTUP_LIMIT, 196608)) == -1  # at the limit: waits
    with pytest.raises(FrameError):
        startup_at(struct.pack("!ii", 100, 196608), limit=99)


# ---------------------------------------------------------------------- the inlined loops

LENGTHS = [-(1 << 31), -1, 0, 3, 4, 5, LIMIT, LIMIT + 1, NO_LIMIT]


@pytest.mark.parametrize("length", LENGTHS)
def test_the_client_pump_refuses_exactly_what_the_framer_refuses(length: int) -> None:
    data = header(b"S", length)
    try:
        frame_at(data, 0, LIMIT)
        refused: FrameError | None = None
    except FrameError as exc:
        refused = exc
    link = make_link()
    link.attach(CTX_NONE)
    if refused is None:
        client_sends(link, data)  # a Sync, or the start of a long frame: no error
        return
    with pytest.raises(ClientProtocolError) as info:
        client_sends(link, data)
    if refused.too_large:
        assert type(info.value) is MessageTooLarge
        assert info.value.message == (
            f"message 'S' of {length} bytes exceeds max_message_size ({LIMIT})")
    else:
        assert type(info.value) is ClientProtocolError
        assert info.value.message == f"invalid length {length} in message 'S'"
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize("length", LENGTHS)
def test_the_server_feed_refuses_exactly_what_the_framer_refuses(length: int) -> None:
    data = header(b"D", length)
    link = make_link()
    link.attach(CTX_NONE)
    if length >= MIN_LENGTH:
        frame_end(data, 0, NO_LIMIT)  # the framer takes it: so does the feed
        if length > MIN_LENGTH:
            server_sends(link, data)  # the start of a frame still arriving
        return
    with pytest.raises(FrameError):
        frame_end(data, 0, NO_LIMIT)
    with pytest.raises(ServerProtocolError) as info:
        server_sends(link, data)
    assert info.value.message == f"invalid length {length} in 'D' from server"
