"""Connecting to libvirtd, its event loop, and its errors as one-line SandboxErrors."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from sandbox.core.errors import SandboxError, ToolMissingError

if TYPE_CHECKING:
    import libvirt

log = logging.getLogger(__name__)


class LibvirtError(SandboxError):
    """libvirt refused or failed (its own message is kept)."""


_loop_lock = threading.Lock()
_loop_started = False


def _module() -> Any:
    try:
        import libvirt
    except ImportError:
        raise ToolMissingError("--connect needs libvirt's Python binding (pip install libvirt-python; apt-get install libvirt-dev pkg-config gcc)") from None
    return libvirt


def event_loop() -> None:
    """libvirt's default event loop, in a thread of its own (streams and lifecycle events need it)."""
    global _loop_started
    lv = _module()
    with _loop_lock:
        if _loop_started:
            return
        lv.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                lv.virEventRunDefaultImpl()

        threading.Thread(target=run, name="sandbox-libvirt-events", daemon=True).start()
        _loop_started = True


def message(exc: Exception) -> str:
    """libvirt's error as one line.

    When QEMU died starting, libvirt quotes its stderr, whose first lines
    are often warnings (a deprecated option): the last line is the error.
    """
    get = getattr(exc, "get_error_message", None)
    lines = [line.strip() for line in ((get() if get is not None else None) or str(exc)).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) == 1:
        return lines[0]
    head = lines[0].split(": qemu-system", 1)[0]  # libvirt's own words, before QEMU's first line
    return f"{head}: {lines[-1]}"


def open_connection(uri: str) -> libvirt.virConnect:
    """A read-write connection to `uri`, with keepalive so that a dead peer is noticed."""
    lv = _module()
    event_loop()
    # libvirt prints its errors to stderr unless a handler takes them.
    lv.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = lv.open(uri)
    except lv.libvirtError as exc:
        text = message(exc)
        head, _, tail = text.partition(": ")
        if head == tail:  # libvirt says some things twice ("authentication failed: authentication failed")
            text = head
        if "authentication" in text.lower():
            raise LibvirtError(f"--connect {uri}: authentication refused ({text})") from None
        raise LibvirtError(f"--connect {uri}: cannot reach libvirtd: {text}") from None
    if conn is None:
        raise LibvirtError(f"--connect {uri}: cannot reach libvirtd")
    try:
        conn.setKeepAlive(5, 3)
    except lv.libvirtError:
        pass  # a local driver connection has no keepalive
    return conn


def is_remote(conn: libvirt.virConnect) -> bool:
    """Whether the libvirtd is on another host: then no path of ours is assumed to exist there."""
    uri = conn.getURI()
    from urllib.parse import urlsplit

    host = urlsplit(uri).hostname
    return bool(host)
