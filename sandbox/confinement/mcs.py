"""sVirt MCS labels: a unique category pair per live sandbox, reserved host-wide.

A reservation is a file named for the pair, held open with an exclusive
flock for the sandbox's lifetime.  The kernel drops the lock when its holder
dies, however it dies, so a crashed launcher's pair is reclaimed by the next
allocation that tries it: no pid files to check, no cleanup daemon.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfinementError

CATEGORIES = 1024  # c0..c1023, as libvirt uses


@dataclass(frozen=True)
class Context:
    """An SELinux security context user:role:type:level."""

    user: str
    role: str
    type: str
    level: str

    def __str__(self) -> str:
        return f"{self.user}:{self.role}:{self.type}:{self.level}"

    @classmethod
    def parse(cls, text: str) -> Context:
        parts = text.split(":", 3)
        if len(parts) != 4 or not all(parts):
            raise ConfinementError(f"bad SELinux context {text!r} (want user:role:type:level)")
        return cls(*parts)


def mcs_level(a: int, b: int) -> str:
    """The MCS level for a category pair, lowest first as SELinux prints it."""
    if a == b or not (0 <= a < CATEGORIES and 0 <= b < CATEGORIES):
        raise ValueError(f"bad category pair {a},{b}")
    lo, hi = sorted((a, b))
    return f"s0:c{lo},c{hi}"


def sandbox_contexts(pair: tuple[int, int], domain: str = "svirt_t", image: str = "svirt_image_t") -> tuple[Context, Context]:
    """(process context, file context) for a category pair, as libvirt's sVirt builds them."""
    level = mcs_level(*pair)
    return Context("system_u", "system_r", domain, level), Context("system_u", "object_r", image, level)


@dataclass
class Reservation:
    """A held category pair; `release()` (or process death) frees it."""

    pair: tuple[int, int]
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


def _try_reserve(directory: Path, pair: tuple[int, int]) -> Reservation | None:
    path = directory / f"c{pair[0]},c{pair[1]}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    # The holder we raced with may have unlinked the file after we opened it:
    # our lock is then on a dead inode, and the pair is not ours.
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return Reservation(pair, path, fd)


def reserve(directory: Path, rng: random.Random | None = None, categories: int = CATEGORIES, attempts: int = 10000) -> Reservation:
    """Reserve a random unused pair (A < B) of categories in [0, categories)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    rng = rng or random.SystemRandom()
    for _ in range(attempts):
        a, b = sorted(rng.sample(range(categories), 2))
        found = _try_reserve(directory, (a, b))
        if found is not None:
            return found
    raise ConfinementError(f"no free MCS category pair in {directory} after {attempts} tries")


def reserve_static(directory: Path, pair: tuple[int, int]) -> Reservation:
    """Reserve a given pair; fails if a live sandbox holds it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    found = _try_reserve(directory, tuple(sorted(pair)))  # type: ignore[arg-type]
    if found is None:
        raise ConfinementError(f"MCS pair c{pair[0]},c{pair[1]} is in use by another sandbox")
    return found
