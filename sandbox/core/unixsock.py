"""AF_UNIX sockets at paths of any length.

A socket's address holds 107 bytes of path, and a runtime dir under a
long `$XDG_RUNTIME_DIR` (or a test's) passes that: bind and connect
then fail with "AF_UNIX path too long".  A longer path is reached
through its directory's descriptor instead (`/proc/self/fd/N/NAME`,
which the kernel resolves like the path itself), without a chdir, which
would move every thread of the launcher.  Written by hand: the standard
library has no such helper.  Light: the pooled client imports it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

MAX_PATH = 107  # sun_path's 108 bytes, one for the NUL


@contextlib.contextmanager
def reachable(path: str | os.PathLike[str]) -> Iterator[str]:
    """`path`, or a short name for it that stays valid while the block runs."""
    text = os.fspath(path)
    if len(os.fsencode(text)) <= MAX_PATH:
        yield text
        return
    parent, name = os.path.split(text)
    fd = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def bind(sock: socket.socket, path: str | os.PathLike[str]) -> None:
    with reachable(path) as short:
        sock.bind(short)


def connect(sock: socket.socket, path: str | os.PathLike[str]) -> None:
    with reachable(path) as short:
        sock.connect(short)
