"""Host-wide reservations of a name (an MCS pair, a uid range), held by a live launcher.

A reservation is a file named for what it reserves, held open with an
exclusive flock for the sandbox's lifetime.  The kernel drops the lock when
its holder dies, however it dies, so a crashed launcher's reservation is
reclaimed by the next one that tries it: no pid files to check, no cleanup
daemon.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sandbox.core.errors import ConfinementError


@dataclass
class Reservation:
    """A held name; `release()` (or the holder's death) frees it."""

    name: str
    path: Path
    fd: int

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)  # before unlocking: a waiter re-checks the inode
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def try_reserve(directory: Path, name: str) -> Reservation | None:
    """Reserve `name` in `directory`, or None while a live holder has it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    # The holder we raced with may have unlinked the file after we opened it:
    # our lock is then on a dead inode, and the name is not ours.
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return Reservation(name, path, fd)


def reserve_random(directory: Path, draw: Callable[[random.Random], str], what: str, attempts: int = 10000,
                   rng: random.Random | None = None) -> Reservation:  # fmt: skip
    """Reserve the first free name among random draws."""
    rng = rng or random.SystemRandom()
    for _ in range(attempts):
        found = try_reserve(directory, draw(rng))
        if found is not None:
            return found
    raise ConfinementError(f"no free {what} in {directory} after {attempts} tries")
