"""AF_UNIX sockets at paths longer than an address holds (sandbox/core/unixsock.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from sandbox.core import unixsock


@pytest.mark.parametrize("length", [107, 108, 300])
def test_bind_and_connect_at_any_length(tmp_path: Path, length: int) -> None:
    parent = tmp_path / "d"
    parent.mkdir()
    # Deep enough that the whole path has `length` bytes (the tmp dir's own length counted).
    room = length - len(os.fsencode(str(parent))) - len("/s")
    if room < 0:
        pytest.fail(f"the tmp dir alone is longer than {length} bytes")
    while room > 0:
        step = min(room, 200)
        name = "x" * max(step - 1, 1)
        parent = parent / name
        parent.mkdir()
        room -= len(name) + 1
    path = parent / "s"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        unixsock.bind(listener, path)
        listener.listen(1)
        assert path.is_socket()  # at the real path, whatever name reached it
        unixsock.connect(client, path)
        peer, _ = listener.accept()
        with peer:
            client.sendall(b"hi")
            assert peer.recv(2) == b"hi"
    if len(os.fsencode(str(path))) > unixsock.MAX_PATH:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as plain, pytest.raises(OSError):
            plain.connect(str(path))  # what every bind and connect did before


def test_the_descriptor_of_a_long_path_is_closed_after(tmp_path: Path) -> None:
    deep = tmp_path / ("y" * 200)
    deep.mkdir()
    before = set(os.listdir("/proc/self/fd"))
    with unixsock.reachable(deep / "s") as short:
        assert short.startswith("/proc/self/fd/") and len(short) <= unixsock.MAX_PATH
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_short_path_is_used_as_it_is() -> None:
    with unixsock.reachable("/tmp/s") as short:
        assert short == "/tmp/s"
