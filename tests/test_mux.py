"""The multiplexed ports' frames (sandbox/wire/mux.py): bounded, checked, and flow-controlled both ways."""

from __future__ import annotations

import selectors
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.wire import mux, protocol
from sandbox.core.errors import GuestProtocolError

KINDS = (b"O", b"R", b"X")


def test_frames_split_anywhere_come_out_whole() -> None:
    stream = mux.encode(b"O", 1, b"hello") + mux.encode(b"X", 2, b"0") + mux.encode(b"R", 3)
    for cut in range(len(stream) + 1):
        reader = mux.FrameReader("exec", KINDS)
        got = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert got == [(b"O", 1, b"hello"), (b"X", 2, b"0"), (b"R", 3, b"")]


def test_an_oversized_frame_is_refused_at_its_header() -> None:
    reader = mux.FrameReader("exec", KINDS)
    header = protocol.MUX_HEADER.pack(b"O", 1, protocol.MUX_MAX_PAYLOAD + 1)
    with pytest.raises(GuestProtocolError, match=r"frame of 262145 bytes on the exec port \(at most 262144\)"):
        reader.feed(header)  # before any payload arrives: nothing is buffered for it


def test_an_unknown_type_is_refused() -> None:
    with pytest.raises(GuestProtocolError, match="unknown type b'Z'"):
        mux.FrameReader("x11", KINDS).feed(mux.encode(b"Z", 1))


@given(st.binary(max_size=4096), st.integers(min_value=1, max_value=64))
def test_random_bytes_never_buffer_more_than_a_frame(data: bytes, step: int) -> None:
    reader = mux.FrameReader("exec", KINDS)
    try:
        for i in range(0, len(data), step):
            reader.feed(data[i : i + step])
            assert len(reader.buf) < protocol.MUX_HDR + protocol.MUX_MAX_PAYLOAD
    except GuestProtocolError:
        pass


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket, selectors.DefaultSelector]]:
    ours, guest = socket.socketpair()
    sel = selectors.DefaultSelector()
    try:
        yield ours, guest, sel
    finally:
        sel.close()
        ours.close()
        guest.close()


def _pump(sel: selectors.DefaultSelector, port: mux.MuxPort, rounds: int = 50) -> None:
    for _ in range(rounds):
        for key, mask in sel.select(0):
            if key.data == port.tag:
                port.on_event(mask)


def test_a_held_port_is_not_read_until_released(pair: tuple[socket.socket, socket.socket, selectors.DefaultSelector]) -> None:
    ours, guest, sel = pair
    got: list[tuple[bytes, int, bytes]] = []
    port = mux.MuxPort("exec", KINDS, lambda k, i, p: got.append((k, i, p)))
    port.attach(sel, ours)
    port.hold("reader-1", True)
    guest.sendall(mux.encode(b"O", 1, b"x"))
    _pump(sel, port)
    assert got == []
    port.hold("reader-1", False)
    _pump(sel, port)
    assert got == [(b"O", 1, b"x")]


def test_congestion_is_reported_both_ways(pair: tuple[socket.socket, socket.socket, selectors.DefaultSelector]) -> None:
    ours, guest, sel = pair
    seen: list[bool] = []
    port = mux.MuxPort("exec", KINDS, lambda k, i, p: None, seen.append)
    port.attach(sel, ours)
    chunk = bytes(protocol.MUX_MAX_PAYLOAD)
    while not port.congested:
        port.send(b"I", 1, chunk)  # the guest reads nothing
    assert seen == [True] and len(port.to_guest) <= mux.HIGH_WATER + protocol.MUX_HDR + len(chunk)
    guest.setblocking(False)
    while port.congested:
        try:
            guest.recv(1 << 20)
        except BlockingIOError:
            pass
        _pump(sel, port, 1)
    assert seen == [True, False]


def test_the_guests_eof_unregisters_the_port(pair: tuple[socket.socket, socket.socket, selectors.DefaultSelector]) -> None:
    ours, guest, sel = pair
    port = mux.MuxPort("x11", KINDS, lambda k, i, p: None)
    port.attach(sel, ours)
    guest.shutdown(socket.SHUT_WR)
    _pump(sel, port)
    assert not port.open and ours not in [k.fileobj for k in sel.get_map().values()]
    port.send(b"O", 1)  # after the end: dropped, not queued
    assert port.to_guest == b""


def test_header_is_the_guests() -> None:
    assert protocol.MUX_HEADER.size == protocol.MUX_HDR == struct.calcsize("<cII")
