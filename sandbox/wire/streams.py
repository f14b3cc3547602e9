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


def watch(sel: selectors.BaseSelector, sock: socket.socket | int, data: object, read: bool, write: bool) -> None:
    """Watch `sock` (a socket or a descriptor) for reading and/or writing, or not at all (then it is unregistered)."""
    events = (selectors.EVENT_READ if read else 0) | (selectors.EVENT_WRITE if write else 0)
    try:
        key = sel.get_key(sock)
    except KeyError:
        if events:
            try:
                sel.register(sock, events, data)
            except ValueError:
                pass  # closed meanwhile
        return
    except (ValueError, RuntimeError):
        return  # the descriptor or the selector closed meanwhile
    if not events:
        sel.unregister(sock)
    elif key.events != events:
        sel.modify(sock, events, data)


def watch_writable(sel: selectors.BaseSelector, sock: socket.socket, data: object, writable: bool) -> None:
    """Read interest always; write interest only while bytes wait to go out (nothing for an unregistered socket: EOF)."""
    try:
        sel.get_key(sock)
    except (KeyError, ValueError):
        return
    watch(sel, sock, data, True, writable)


def watch_readable(sel: selectors.BaseSelector, sock: socket.socket, data: object, readable: bool, writable: bool) -> None:
    """Read interest while `readable` (a paused source is not read), write interest while bytes wait."""
    watch(sel, sock, data, readable, writable)


def recv_some(sock: socket.socket, limit: int) -> bytes | None:
    """What the socket has now: None if nothing yet, b"" at EOF (or a dead peer)."""
    try:
        return sock.recv(limit)
    except BlockingIOError:
        return None
    except OSError:
        return b""
