"""Which host trees are unchanged since a fingerprint, known at once: inotify watches on every directory of each.

A run's own check of its trees (hostfiles.digests) walks them: ~50 ms for
/usr/include here, which a pooled run would wait for.  The pool keeps a
TreeWatcher instead: it puts a watch on every directory of a tree and
only then takes the tree's fingerprint, so any change after that point
queues an event (the kernel queues it before the changing call returns).
Asked about a tree, it first reads every queued event: a tree with none
still has the fingerprint it took.  An overflowed queue, a watch that
could not be placed, a tree not watched yet: unknown, and the run walks
the tree itself.

Known limit: inotify reports no write through a shared writable mapping
(mmap), which a walk would see in the file's ctime; such a change reaches
a pooled run's tree only once something else in its directory changes.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

# inotify(7).  By hand (ctypes): three system calls; a dependency for them
# would cost the package more than this does.
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_UNMOUNT, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x2000, 0x4000, 0x8000
IN_ONLYDIR, IN_DONT_FOLLOW = 0x01000000, 0x02000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
CHANGES = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
           | IN_DELETE_SELF | IN_MOVE_SELF)  # fmt: skip
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name)

_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    """An inotify instance (non-blocking); `close` ends it."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.fd = fd

    def add(self, path: str) -> int:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), CHANGES | IN_ONLYDIR | IN_DONT_FOLLOW)
        if wd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_add_watch {path}: {os.strerror(e)}")
        return int(wd)

    def read(self) -> list[tuple[int, int]]:
        """(watch, mask) of every event queued now."""
        events: list[tuple[int, int]] = []
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return events
            events += parse_events(data)

    def close(self) -> None:
        os.close(self.fd)


def parse_events(data: bytes) -> list[tuple[int, int]]:
    """(watch, mask) of each inotify_event in `data` (pure)."""
    out = []
    at = 0
    while at + EVENT.size <= len(data):
        wd, mask, _cookie, length = EVENT.unpack_from(data, at)
        out.append((wd, mask))
        at += EVENT.size + length
    return out


def directories(tree: str) -> list[str]:
    """Every directory of `tree`, itself first, links not followed."""
    found = [tree]
    for top, dirs, _files in os.walk(tree, onerror=_raise):
        found += [os.path.join(top, d) for d in dirs if not os.path.islink(os.path.join(top, d))]
    return found


def ancestors(tree: str) -> list[str]:
    """The directories on the way to `tree`: "/", then each one below it, not `tree` itself."""
    parts = [p for p in tree.split("/") if p][:-1]
    return ["/"] + ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _raise(exc: OSError) -> None:
    raise exc


class TreeWatcher:
    """Trees with the fingerprint each had when its watches were placed, while no event came; thread-safe."""

    def __init__(self, fingerprint: Callable[[list[str]], dict[str, str | None]]) -> None:
        self.fingerprint = fingerprint
        self.lock = threading.Lock()
        self.inotify = Inotify()
        self.digest: dict[str, str | None] = {}  # tree -> its fingerprint since its watches: unchanged while it is here
        self.owner: dict[int, set[str]] = {}  # watch -> the trees it is on (an ancestor may be on several)
        self.busy: set[str] = set()  # trees being (re)watched

    def current(self, trees: Iterable[str]) -> dict[str, str | None]:
        """tree -> the fingerprint it still has, for each tree watched and unchanged (reads the queue first); others absent."""
        with self.lock:
            self._drain()
            return {t: self.digest[t] for t in trees if t in self.digest}

    def watch(self, trees: Iterable[str]) -> None:
        """Watch these trees (again, if they changed), in the caller's thread; a tree that cannot be watched stays unknown."""
        for tree in trees:
            with self.lock:
                self._drain()
                if tree in self.digest or tree in self.busy:
                    continue
                self.busy.add(tree)
            try:
                self._watch(tree)
            finally:
                with self.lock:
                    self.busy.discard(tree)

    def known(self) -> list[str]:
        """The trees watched and unchanged."""
        with self.lock:
            self._drain()
            return list(self.digest)

    def unknown(self, trees: Iterable[str]) -> list[str]:
        with self.lock:
            self._drain()
            return [t for t in trees if t not in self.digest and t not in self.busy]

    def forget(self, tree: str) -> None:
        """Treat `tree` as changed (its next `watch` takes a new fingerprint)."""
        with self.lock:
            self._forget(tree)

    def _forget(self, tree: str) -> None:
        self.digest.pop(tree, None)
        for wd, trees in list(self.owner.items()):
            trees.discard(tree)
            if not trees:
                del self.owner[wd]

    def _watch(self, tree: str) -> None:
        try:
            # Its ancestors too: a directory on the way renamed or replaced puts other directories at the tree's path.
            wds = [self.inotify.add(d) for d in ancestors(tree) + directories(tree)]
        except OSError as exc:
            # ENOSPC: the user's max_user_watches; ENOENT: it changed meanwhile (the next ask tries again).
            log.info("cannot watch %s: %s", tree, exc if exc.errno != errno.ENOSPC else "no inotify watches left")
            return
        with self.lock:
            for wd in wds:
                self.owner.setdefault(wd, set()).add(tree)
        digest = self.fingerprint([tree]).get(tree)  # after the watches: a change from here on is an event
        with self.lock:
            self._drain()
            if all(tree in self.owner.get(wd, ()) for wd in wds):  # no event dropped any of them meanwhile
                self.digest[tree] = digest

    def _drain(self) -> None:
        for wd, mask in self.inotify.read():
            if mask & IN_Q_OVERFLOW:
                log.info("inotify queue overflowed: every tree is unknown until watched again")
                self.digest.clear()
                self.owner.clear()
                continue
            # Their watches stay placed (a later walk re-adds them, same watch ids); events for them just find them changed.
            for tree in list(self.owner.get(wd, ())):
                self._forget(tree)

    def close(self) -> None:
        self.inotify.close()
