"""What a pooled guest has of the host's files in its cache, and whether the host still has exactly that.

A pooled guest is exercised before its run (guest-init/pool.c): it
mounts the host's root and runs a few programs from it, whose pages and
lookups then stay in its cache (9p, cache=loose, which never asks again),
so that its run starts on code QEMU has translated.  The price: what it
read then must still be what the host has when the run starts.

Everything it can have read is here: each program, the dynamic loader and
libraries it loads (ldd's word), the loader's files in /etc, and every
directory and symbolic link on the way to each.  A guest's fingerprint
of those is taken before it is exercised; the pool hands it to a run only
if the host's fingerprint is still the same (daemon.py), else it ends
it.  A directory's mtime changes with every entry made, removed or
renamed in it (a lookup that found nothing included), a file's ctime
with every write or change of mode or owner, and neither can be set back
by anyone: so the check is complete for these paths.  It costs some 30
stat calls per hand-off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable

# The programs guest-init/pool.c runs (a test checks that the two agree).
PROGRAMS = ("/bin/sh", "/bin/true", "/usr/bin/env")
# What the dynamic loader reads (or looks for) before any library.
LOADER_FILES = ("/etc/ld.so.cache", "/etc/ld.so.preload")
MAX_LINKS = 40  # as the kernel's own limit on a path walk

Fingerprint = tuple[tuple[str, tuple[int, ...] | None], ...]


def libraries(programs: Iterable[str]) -> list[str]:
    """The libraries and loader the programs load, as ldd resolves them on this host ([] when ldd cannot say)."""
    try:
        out = subprocess.run(["ldd", *programs], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        for word in line.split():
            if word.startswith("/") and not word.endswith(":"):
                found.append(word)
    return sorted(set(found))


def walk(path: str) -> list[str]:
    """Every path a lookup of `path` passes: each directory, each symbolic link (followed), and the end."""
    seen: list[str] = ["/"]
    pending = [c for c in path.split("/") if c]
    current = "/"
    links = 0
    while pending:
        name = pending.pop(0)
        if name == ".":
            continue
        if name == "..":
            current = os.path.dirname(current.rstrip("/")) or "/"
            continue
        candidate = os.path.join(current, name)
        seen.append(candidate)
        try:
            target = os.readlink(candidate)
        except OSError:
            current = candidate  # not a link (or not there: its directory's mtime covers its coming)
            continue
        links += 1
        if links > MAX_LINKS:
            break
        if target.startswith("/"):
            current = "/"
        pending = [c for c in target.split("/") if c] + pending
    return seen


def watched_paths(programs: Iterable[str] = PROGRAMS) -> tuple[str, ...]:
    """Every path the exercise can have looked up or read."""
    programs = list(programs)
    paths: set[str] = set()
    for p in [*programs, *LOADER_FILES, *libraries(programs)]:
        paths.update(walk(p))
    return tuple(sorted(paths))


def boot_inputs(qemu: str) -> tuple[str, ...]:
    """What a pool's guests were made from on the host: the kernels and their modules (a run takes the newest), and QEMU."""
    # Their own entries (by path: a replaced file is another inode), not the directories on the way.
    return tuple(sorted({os.path.realpath(p) for p in ("/boot", "/lib/modules", shutil.which(qemu) or qemu)}))


# A file's timestamps come from a coarse clock (a tick of 1-10 ms on most
# kernels before 6.13's fine-grained ones): two changes within one tick can
# leave the same ctime.  So a fingerprint is trusted only once every entry's
# last change is older than this: a later change then shows, as git treats
# its "racily clean" index entries.
RACY_NS = 20_000_000
SETTLE_TRIES = 50  # then the fingerprint is given up on: () matches no host, and the guest ends as stale


def settled_fingerprint(paths: Iterable[str], clock: Callable[[], int] = time.time_ns,
                        sleep: Callable[[float], None] = time.sleep) -> Fingerprint:  # fmt: skip
    """fingerprint(paths), taken when no entry changed within RACY_NS of it (else ())."""
    paths = list(paths)
    for _ in range(SETTLE_TRIES):
        found = fingerprint(paths)
        now = clock()
        if all(st is None or now - max(st[4], st[5]) >= RACY_NS for _, st in found):
            return found
        sleep(RACY_NS / 1e9)
    return ()


MOUNTINFO_MAX = 4 << 20  # bytes of /proc/self/mountinfo read (a host with this many mounts is compared by its first 4 MiB)


def mount_table(path: str = "/proc/self/mountinfo") -> bytes:
    """A digest of this process's mount table, or b"" when it cannot be read.

    A guest's QEMU gets a copy of the mount table when its namespace is
    made, and a mount or unmount on the host after that does not reach it
    where the host's mounts are private (no propagation): its 9p root would
    then show the host as it was.  So a guest is handed over only while the
    table is the one it was made with; any mount or unmount anywhere on the
    host ends the ready guests (a restore serves the run).
    """
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read(MOUNTINFO_MAX)).digest()
    except OSError:
        return b""


def fingerprint(paths: Iterable[str]) -> Fingerprint:
    """For each path: inode, mode, size, mtime and ctime (ns) of the entry itself, or None where nothing is."""
    out: list[tuple[str, tuple[int, ...] | None]] = []
    for p in paths:
        try:
            st = os.lstat(p)
            out.append((p, (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)))
        except OSError:
            out.append((p, None))
    return tuple(out)
