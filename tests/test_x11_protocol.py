"""The pure parts of --x11: set-up rewriting, framing, Xauthority records."""

import struct

from sandbox.wire import mux
from sandbox.features import x11


def client_setup(order: bytes, name: bytes, data: bytes) -> bytes:
    fmt = "<" if order == b"l" else ">"
    def pad(b: bytes) -> bytes:
        return b + b"\0" * ((4 - len(b) % 4) % 4)

    return order + b"\0" + struct.pack(fmt + "HHHHH", 11, 0, len(name), len(data), 0) + pad(name) + pad(data)


def test_setup_with_no_credentials_gets_the_cookie() -> None:
    for order in (b"l", b"B"):
        msg = client_setup(order, b"", b"")
        assert x11.setup_length(msg[:11]) is None
        assert x11.setup_length(msg) == len(msg) == 12
        cookie = bytes(range(16))
        out = x11.rewrite_setup(msg, cookie)
        assert out == client_setup(order, b"MIT-MAGIC-COOKIE-1", cookie)


def test_guest_supplied_credentials_are_replaced() -> None:
    msg = client_setup(b"l", b"XDM-AUTHORIZATION-1", b"guest-guess-0123456789")
    assert x11.setup_length(msg) == len(msg)
    out = x11.rewrite_setup(msg, b"k" * 16)
    assert b"guest-guess" not in out and out.endswith(b"k" * 16)


def test_frames_and_xauth_records() -> None:
    assert mux.encode(x11.DATA, 7, b"abc") == b"D" + struct.pack("<II", 7, 3) + b"abc"
    assert len(mux.encode(x11.CLOSE, 1)) == 9
    rec = x11.xauth_entry(3, b"c" * 16, b"host")
    assert rec == struct.pack(">H", 256) + b"\0\x04host" + b"\0\x013" + b"\0\x12MIT-MAGIC-COOKIE-1" + b"\0\x10" + b"c" * 16


def test_xpra_mode_runs_the_command_under_the_wrapper() -> None:
    from sandbox.features.x11 import XPRA_DISPLAY, XPRA_WRAPPER, XpraSession

    session = XpraSession("800x600", "/usr/bin/xpra")
    argv = session.guest_argv(("xmessage", "-name", "a b", "hi"))
    assert argv == ("/bin/sh", "-c", XPRA_WRAPPER, "sandbox-xpra", str(XPRA_DISPLAY), "800x600", "xmessage", "-name", "a b", "hi")
    # The wrapper passes the command's words through untouched and returns its status.
    assert 'DISPLAY=":$display" "$@"' in XPRA_WRAPPER and "exit $status" in XPRA_WRAPPER
    assert "--clipboard=no" in XPRA_WRAPPER
