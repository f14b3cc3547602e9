"""A multiplexed virtio-serial port: frames of (type, id, length, payload) both ways, in the relay's loop.

X11 connections (sandbox/features/x11.py) and `sandbox exec` processes
(sandbox/features/execs.py) each share one port this way; guest-init/mux.c is the
other end.  The guest is untrusted: every frame it sends is checked
(known type, length at most MUX_MAX_PAYLOAD) and a violation ends the run
(GuestProtocolError).  Buffers are bounded both ways:

- towards the guest, the handler stops reading its sources while more
  than HIGH_WATER bytes wait (`congested`), and is told when they drained;
- from the guest, a handler whose own outbound buffers are full `hold`s
  the port: it is not read until released, so a guest cannot make the
  launcher buffer more than a frame per handler's limit.
"""

from __future__ import annotations

import selectors
import socket
from collections.abc import Callable, Iterable

from sandbox.wire import protocol
from sandbox.core.errors import GuestProtocolError
from sandbox.wire.streams import recv_some, send_some

HIGH_WATER = 1 << 20  # bytes queued for the guest before the handler pauses its sources


def encode(kind: bytes, ident: int, payload: bytes = b"") -> bytes:
    """One frame."""
    if len(payload) > protocol.MUX_MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes")
    return protocol.MUX_HEADER.pack(kind, ident, len(payload)) + payload


class FrameReader:
    """Frames out of a byte stream from the guest; never holds more than one frame's worth."""

    def __init__(self, port: str, kinds: Iterable[bytes]) -> None:
        self.port = port
        self.kinds = frozenset(kinds)
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, int, bytes]]:
        """The whole frames that `data` completes (raises GuestProtocolError on a malformed one)."""
        self.buf += data
        frames = []
        size = protocol.MUX_HEADER.size
        while len(self.buf) >= size:
            kind, ident, length = protocol.MUX_HEADER.unpack_from(self.buf)
            if kind not in self.kinds:
                raise GuestProtocolError(f"the guest sent a frame of unknown type {kind!r} on the {self.port} port")
            if length > protocol.MUX_MAX_PAYLOAD:
                raise GuestProtocolError(
                    f"the guest sent a frame of {length} bytes on the {self.port} port (at most {protocol.MUX_MAX_PAYLOAD})"
                )
            if len(self.buf) < size + length:
                break
            frames.append((bytes(kind), int(ident), bytes(self.buf[size : size + length])))
            del self.buf[: size + length]
        return frames


class MuxPort:
    """One multiplexed port registered in the relay's selector; `on_frame` gets each frame from the guest."""

    def __init__(
        self,
        name: str,
        kinds: Iterable[bytes],
        on_frame: Callable[[bytes, int, bytes], None],
        on_congestion: Callable[[bool], None] = lambda congested: None,
    ) -> None:
        self.name = name
        self.reader = FrameReader(name, kinds)
        self.on_frame = on_frame
        self.on_congestion = on_congestion
        self.to_guest = bytearray()
        self.sel: selectors.BaseSelector | None = None
        self.sock: socket.socket | None = None
        self.open = False  # registered, and the guest's end not closed
        self.holds: set[object] = set()
        self.congested = False

    @property
    def tag(self) -> tuple[str, int]:
        return (f"{self.name}-port", 0)

    def attach(self, sel: selectors.BaseSelector, sock: socket.socket) -> None:
        self.sel, self.sock = sel, sock
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, self.tag)
        self.open = True

    def close(self) -> None:
        self._unregister()
        self.sel = None  # the relay's selector may be closed already: nothing more to watch

    def send(self, kind: bytes, ident: int, payload: bytes = b"") -> None:
        """Queue a frame for the guest (dropped once the port is gone)."""
        if not self.open:
            return
        self.to_guest += encode(kind, ident, payload)
        self._flush()

    def hold(self, who: object, held: bool) -> None:
        """Stop (or resume) reading from the guest on behalf of `who`, whose buffers are full."""
        if held:
            self.holds.add(who)
        else:
            self.holds.discard(who)
        self._update()

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ and self.open and not self.holds:
            self._read()

    def _read(self) -> None:
        assert self.sock is not None
        data = recv_some(self.sock, protocol.MUX_MAX_PAYLOAD + protocol.MUX_HEADER.size)
        if data is None:
            return
        if not data:
            self._unregister()  # the guest closed its end
            return
        for kind, ident, payload in self.reader.feed(data):
            self.on_frame(kind, ident, payload)

    def _flush(self) -> None:
        if self.sock is None or not self.open:
            return
        if not send_some(self.sock, self.to_guest):
            self._unregister()
            return
        congested = len(self.to_guest) > HIGH_WATER
        if congested != self.congested:
            self.congested = congested
            self.on_congestion(congested)
        self._update()

    def _update(self) -> None:
        if self.sel is None or self.sock is None or not self.open:
            return
        events = (0 if self.holds else selectors.EVENT_READ) | (selectors.EVENT_WRITE if self.to_guest else 0)
        if events == 0:
            # A selector cannot watch for nothing: unregistered until there is something.
            try:
                self.sel.unregister(self.sock)
            except (KeyError, ValueError, RuntimeError):
                pass
            return
        try:
            key = self.sel.get_key(self.sock)
        except RuntimeError:
            return  # the selector is closed: the run is over
        except KeyError:
            self.sel.register(self.sock, events, self.tag)
            return
        if key.events != events:
            self.sel.modify(self.sock, events, self.tag)

    def _unregister(self) -> None:
        if self.sel is not None and self.sock is not None:
            try:
                self.sel.unregister(self.sock)
            except (KeyError, ValueError, RuntimeError):
                pass
        self.open = False
        self.to_guest.clear()
