"""Small helpers for the non-blocking sockets of the launcher's event loop."""

from __future__ import annotations

import selectors
import socket


def send_some(sock: socket.socket, pending: bytearray) -> bool:
    """Send what the socket takes now and drop it from `pending`; False if the peer is gone."""
    if pending:
        try:
            del pending[: sock.send(pending)]
        except BlockingIOError:
            pass
        except OSError:
            pending.clear()
            return False
    return True


def watch_writable(sel: selectors.BaseSelector, sock: socket.socket, data: object, writable: bool) -> None:
    """Read interest always; write interest only while bytes wait to go out."""
    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writable else 0)
    try:
        if sel.get_key(sock).events != events:
            sel.modify(sock, events, data)
    except (KeyError, ValueError):
        pass  # unregistered (EOF) or closed meanwhile


def recv_some(sock: socket.socket, limit: int) -> bytes | None:
    """What the socket has now: None if nothing yet, b"" at EOF (or a dead peer)."""
    try:
        return sock.recv(limit)
    except BlockingIOError:
        return None
    except OSError:
        return b""
