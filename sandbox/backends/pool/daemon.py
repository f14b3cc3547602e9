"""The pool: one per user, keeping `size` guests ready and handing each to one `sandbox run`.

It listens on `pool.sock` in the user's runtime base (0700, the user's
own), holds `pool.lock` while it lives (a second pool exits at once, and a
killed one's socket is replaced by the next), and talks only to
processes of its own uid (SO_PEERCRED).  A run asks for a guest with the
key of what it needs (key.py); the pool answers with the guest's channels
and QEMU's pidfd, or with why not.  Each guest serves one run: when that
run's connection closes (it ended, or its launcher was killed), the guest
is ended and its walls come down, and a new one is made, at the lowest
priority, in a thread of its own.  With no run for `idle` seconds the
pool ends.  Its QEMUs die with it (parent-death signal).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from sandbox.backends.base import BootSpec, boot_spec
from sandbox.backends.direct.backend import DirectBackend
from sandbox.backends.pool import freshness
from sandbox.backends.pool import key as keys
from sandbox.backends.pool import wire
from sandbox.backends.pool.guests import NoTemplate, ReadyGuest
from sandbox.backends.pool.launchers import Launchers
from sandbox.backends.pool import paths
from sandbox.backends.pool.paths import lock_path, log_path, socket_path
from sandbox.confinement import walls
from sandbox.core import process
from sandbox.core.errors import SandboxError
from sandbox.image import hostfiles
from sandbox.image.treewatch import TreeWatcher
from sandbox.plan.mounts import Plan
from sandbox.plan.request import RunRequest
from sandbox.core import unixsock

log = logging.getLogger(__name__)

RETRY_AFTER = 5.0  # s before making a guest again after a failure
TREE_RECHECK = 30.0  # s between walks of the watched trees (what inotify cannot see: see treewatch.py)


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    served: int = 0
    refills: int = 0
    misses: int = 0
    failures: int = 0
    stale: int = 0  # guests ended unused: host files they had read changed
    last_error: str = ""


@dataclass
class Serving:
    """A guest handed to a run, until the run's connection or the guest ends."""

    conn: socket.socket
    guest: ReadyGuest


class Pool:
    """The daemon's state; `serve` runs it until it ends."""

    def __init__(self, request: RunRequest, boot: BootSpec, backend: DirectBackend, size: int, idle: float) -> None:
        self.request, self.boot, self.backend = request, boot, backend
        self.key = keys.key(request)
        self.install = paths.install_id()  # as it was when this code was imported, not as the files on disk are now
        self.spec = walls.resolve(request.confinement) if request.confinement is not None else None
        self.size, self.idle = size, idle
        self.watch = freshness.watched_paths()  # what a guest's exercise reads of the host's files
        self.inputs = freshness.boot_inputs(boot.qemu)
        self.inputs_then = freshness.fingerprint(self.inputs)  # a new kernel or QEMU: a run would take it, so the pool ends
        self.ready: list[ReadyGuest] = []
        self.serving: dict[int, Serving] = {}  # by the run's connection's fd
        self.stats = Stats()
        self.launchers = Launchers(log_path())
        self.sel = selectors.DefaultSelector()
        self.changed = threading.Condition()  # guards `ready`; notified when a guest is taken or the pool ends
        self.stopping = threading.Event()  # no more runs, no more guests
        # The filler lives until the very end: the QEMUs it started get
        # their parent-death signal when it (the thread) ends, and a run
        # may still be using one after `stopping`.
        self.ended = False
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.last_run = time.monotonic()
        self.filler = threading.Thread(target=self._fill, name="sandbox-pool-fill", daemon=True)
        # Host trees served from images: watched, so that a run learns at once which are unchanged (hostfiles.py).
        self.trees: TreeWatcher | None = None
        try:
            self.trees = TreeWatcher(hostfiles.digests)
        except OSError as exc:
            log.info("pool: no tree watcher (%s): runs check their trees themselves", exc)
        # Per watched tree, the host's mount table when its walk began: inotify sees no mount or unmount,
        # so the watcher's word on a tree holds only while the table is that one (_vouched).
        self.tree_mounts: dict[str, bytes] = {}
        self.to_watch: list[str] = list(hostfiles.default_trees())
        self.watching = threading.Event()  # set: trees wait to be watched
        self.watching.set()
        self.watcher = threading.Thread(target=self._watch_trees, name="sandbox-pool-trees", daemon=True)

    def stop(self) -> None:
        """End after the runs being served (safe from a signal handler)."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"x")

    # ---- making guests (the filler thread) ----------------------------------

    def _fill(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.ended or (len(self.ready) < self.size and not self.stopping.is_set()))
                if self.ended:
                    return
            guest = ReadyGuest(self.backend, self.boot, self.spec, self.watch, self._current_images())
            try:
                guest.prepare()
            except Exception as exc:  # noqa: BLE001 - any failure: said in status, tried again later
                self.stats.failures += 1
                self.stats.last_error = str(exc)
                log.warning("pool: a guest could not be made: %s", exc)
                with self.changed:
                    self.changed.wait_for(lambda: self.ended, RETRY_AFTER if not isinstance(exc, NoTemplate) else 4 * RETRY_AFTER)
                continue
            if not guest.mounts or guest.mounts != freshness.mount_table():
                self.stats.stale += 1  # the host's mounts changed while it was made: it would show the old ones
                guest.close()
                with self.changed:  # a host whose mounts churn gets a guest a second, not a busy loop
                    self.changed.wait_for(lambda: self.ended, 1.0)
                continue
            with self.changed:
                kept = not self.stopping.is_set()
                if kept:
                    self.ready.append(guest)
                    self.stats.refills += 1
            if not kept:
                guest.close()
            with contextlib.suppress(OSError):
                os.write(self.wake_w, b"x")  # the main loop watches its end

    # ---- host trees (a thread of its own) ----------------------------------------

    def _watch_trees(self) -> None:
        """Watch the trees runs ask about; walk the watched ones every TREE_RECHECK s for what inotify cannot see."""
        assert self.trees is not None
        hostfiles.background_priority()
        while not self.stopping.is_set():
            self.watching.wait(TREE_RECHECK)
            self.watching.clear()
            if self.stopping.is_set():
                return
            with self.changed:
                wanted, self.to_watch = self.to_watch, []
            for tree, then in self.trees.current(self.trees.known()).items():
                if hostfiles.digests([tree]).get(tree) != then:
                    self.trees.forget(tree)  # changed unseen (a write through mmap, a hard link, a mount)
            to_watch = sorted(set(wanted) | set(self.trees.unknown(hostfiles.default_trees())))
            mounts = freshness.mount_table()  # before the walks: a mount during one shows as a change
            for tree in to_watch:
                self.trees.forget(tree)  # no word from an older walk, with an older table, while this one runs
            with self.changed:
                self.tree_mounts.update((t, mounts) for t in to_watch)
            self.trees.watch(to_watch)

    def _vouched(self, trees: list[str]) -> dict[str, str | None]:
        """The watcher's word on `trees` (trees.current), less trees whose walk saw another mount table (those are walked again)."""
        assert self.trees is not None
        now = self.trees.current(trees)
        mounts = freshness.mount_table()
        with self.changed:
            moved = [t for t in now if not mounts or self.tree_mounts.get(t) != mounts]
            self.to_watch += moved
        for tree in moved:
            self.trees.forget(tree)
            del now[tree]
        if moved:
            self.watching.set()
        return now

    def _current_images(self) -> tuple[str, ...]:
        """The images of the default trees the watcher vouches for now: a guest made now mounts them ahead."""
        if self.trees is None:
            return ()
        now = self._vouched(list(hostfiles.default_trees()))
        return tuple(v.image for v in (hostfiles.judge(t, d) for t, d in now.items()) if v.image is not None)

    def _images(self, message: dict[str, Any]) -> dict[str, Any]:
        """Which of the asked trees have a current image, by the watcher; trees it does not know are watched from now."""
        trees = [t for t in message.get("trees", []) if isinstance(t, str)][:64]
        if self.trees is None or message.get("images_dir") != str(hostfiles.images_dir()):
            return {"ok": True, "images": {}, "decided": []}
        now = self._vouched(trees)
        found: dict[str, str] = {}
        stale = []
        for tree, digest in now.items():
            v = hostfiles.judge(tree, digest)
            if v.image is not None:
                found[tree] = v.image
            elif v.build:
                stale.append(tree)
        if stale:
            hostfiles.start_build(stale)
        unknown = self.trees.unknown(trees)
        if unknown:
            with self.changed:
                self.to_watch += unknown
            self.watching.set()
        return {"ok": True, "images": found, "decided": list(now)}

    # ---- the main loop ----------------------------------------------------------

    def serve(self, listener: socket.socket) -> None:
        sel = self.sel
        sel.register(listener, selectors.EVENT_READ, ("listen", None))
        sel.register(self.wake_r, selectors.EVENT_READ, ("wake", None))
        self.filler.start()
        if self.trees is not None:
            self.watcher.start()
        listening = True
        try:
            while True:
                if self.stopping.is_set() and listening:
                    sel.unregister(listener)
                    listener.close()  # a run that asks now finds no pool and restores
                    listening = False
                    self._drop_ready()
                    self.launchers.close()
                if self.stopping.is_set() and not self.serving:
                    return
                self._watch_new_guests()
                self.launchers.reap()
                if listening and self.launchers.wanted():
                    launcher = self.launchers.start()
                    if launcher is not None:
                        sel.register(launcher.sock, selectors.EVENT_READ, ("launcher", launcher))
                for key, _mask in sel.select(self._timeout()):
                    what, obj = key.data
                    if what == "listen":
                        self._accept(listener)
                    elif what == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(self.wake_r, 4096)
                    elif what == "launcher":
                        sel.unregister(key.fileobj)
                        if self.launchers.heard(obj):
                            sel.register(obj.sock, selectors.EVENT_READ, ("launcher-ready", obj))
                    elif what == "launcher-ready":
                        sel.unregister(key.fileobj)  # a ready launcher says nothing more: it ended
                        self.launchers.lost(obj)
                    elif what == "ready-end":
                        self._lost_ready(obj)
                    elif what == "run":
                        self._run_ended(obj)
        finally:
            self.stopping.set()
            self._drop_ready()
            self.launchers.close()
            for s in list(self.serving.values()):
                s.guest.close()
                s.conn.close()
            self.serving.clear()
            with self.changed:
                self.ended = True
                self.changed.notify_all()
            self.filler.join(PREP_JOIN)
            if self.trees is not None:
                self.watching.set()
                if self.watcher.is_alive():
                    self.watcher.join(PREP_JOIN)
                self.trees.close()
            self._drop_ready()  # one the filler finished meanwhile
            sel.close()

    def _timeout(self) -> float | None:
        """How long the loop may sleep: until the pool is idle for `idle`, or a launcher is due (or to reap one)."""
        waits = []
        if not self.serving and not self.stopping.is_set():
            waits.append(max(0.0, self.last_run + self.idle - time.monotonic()))
        if self.launchers.running:
            waits.append(1.0)
        if self.launchers.next_start > time.monotonic():
            waits.append(self.launchers.next_start - time.monotonic())
        if not self.serving and not self.stopping.is_set() and waits[0] == 0.0:
            log.info("pool: no run for %g s; ending", self.idle)
            self.stop()
        return min(waits) if waits else None

    def _watch_new_guests(self) -> None:
        with self.changed:
            fresh = [g for g in self.ready if not g.watched]
        for g in fresh:
            self.sel.register(g.end_fd, selectors.EVENT_READ, ("ready-end", g))
            g.watched = True

    def _unwatch(self, guest: ReadyGuest) -> None:
        if guest.watched:
            self.sel.unregister(guest.end_fd)
            guest.watched = False

    def _drop_ready(self) -> None:
        with self.changed:
            dropped, self.ready = self.ready, []
        for g in dropped:
            self._unwatch(g)
            g.close()

    def _lost_ready(self, guest: ReadyGuest) -> None:
        """A waiting guest's QEMU ended (killed from outside): forget it; the filler makes another."""
        with self.changed:
            if guest in self.ready:
                self.ready.remove(guest)
            self.changed.notify_all()
        self._unwatch(guest)
        guest.close()

    # ---- what runs ask ----------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        try:
            if wire.peer_uid(conn) != os.geteuid():
                conn.close()  # another user's process: never served, never answered
                return
            conn.settimeout(ASK_TIMEOUT)
            message, fds = wire.receive(conn)
            for fd in fds:
                os.close(fd)
            self._answer(conn, message)
        except (OSError, SandboxError) as exc:
            log.info("pool: a client went wrong: %s", exc)
            conn.close()

    def _answer(self, conn: socket.socket, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "status":
            wire.send(conn, self.status())
        elif op == "stop":
            wire.send(conn, {"ok": True, "serving": len(self.serving)})
            self.stop()
        elif op == "launch":
            self.last_run = time.monotonic()
            # "go" first: the user's process then speaks to the launcher, which holds the connection from here on.
            if message.get("install") != self.install:
                wire.send(conn, {"op": "busy", "why": "the pool is another installation's of sandbox"})
            elif self.launchers.ready:
                wire.send(conn, {"op": "go"})
                for launcher in list(self.launchers.ready):
                    self.sel.unregister(launcher.sock)
                    if self.launchers.hand(launcher, conn):
                        break
                    # gone: the user's process sees the connection close before a launcher took its run, and runs it itself
            else:
                wire.send(conn, {"op": "busy", "why": "no launcher ready"})
        elif op == "images":
            wire.send(conn, self._images(message))
        elif op == "run":
            self._hand_off(conn, message)
            return
        else:
            wire.send(conn, {"ok": False, "why": f"unknown request {op!r}"})
        conn.close()

    def _hand_off(self, conn: socket.socket, message: dict[str, Any]) -> None:
        self.last_run = time.monotonic()
        guest = None
        stale: list[ReadyGuest] = []
        if freshness.fingerprint(self.inputs) != self.inputs_then:
            why = "the host's kernels or QEMU changed since the pool started: it ends, and the next run starts another"
            self.stop()
        elif message.get("key") != self.key:
            why = "the pool's guests are made for other options (`sandbox pool stop` ends it; the next run starts one for its own)"
        else:
            now, mounts = freshness.fingerprint(self.watch), freshness.mount_table()
            with self.changed:
                while self.ready and guest is None:
                    candidate = self.ready.pop(0)
                    if candidate.fingerprint == now and candidate.mounts == mounts and mounts:
                        guest = candidate
                    else:
                        stale.append(candidate)  # the host's files it read changed since
                self.changed.notify_all()
            why = "no guest ready yet" if not stale else "the host's files or mounts changed since the guests ready were made"
        try:
            self._serve(conn, guest, message, why)
        finally:
            for g in stale:
                self.stats.stale += 1
                self._unwatch(g)
                g.close()

    def _serve(self, conn: socket.socket, guest: ReadyGuest | None, message: dict[str, Any], why: str) -> None:
        if guest is None:
            self.stats.misses += 1
            wire.send(conn, {"ok": False, "why": why})
            conn.close()
            return
        self._unwatch(guest)
        try:
            asker = wire.peer_pid(conn)  # a launcher of the pool's stands for the process the user started
            handed = guest.hand_off(message.get("command"), self.launchers.users.get(asker, asker), message.get("nice"))
        except OSError as exc:
            guest.close()  # its QEMU ended meanwhile
            wire.send(conn, {"ok": False, "why": f"the guest ended ({exc})"})
            conn.close()
            return
        try:
            wire.send(conn, {"ok": True, **handed.info}, handed.fds)
        except OSError:
            guest.close()  # the run went away before it got it
            conn.close()
            return
        finally:
            for fd in handed.fds:
                os.close(fd)
        self.stats.served += 1
        conn.settimeout(ASK_TIMEOUT)
        self.serving[conn.fileno()] = Serving(conn, guest)
        self.sel.register(conn, selectors.EVENT_READ, ("run", conn.fileno()))

    def _run_ended(self, fd: int) -> None:
        """The run said how it ended, or its connection closed (its launcher ended, however): end its guest."""
        s = self.serving.pop(fd, None)
        if s is None:
            return
        self.sel.unregister(s.conn)
        try:
            message, fds = wire.receive(s.conn)
            for extra in fds:
                os.close(extra)
            status = message.get("status")
            s.guest.ended(status if isinstance(status, int) and not isinstance(status, bool) else None)
        except (OSError, SandboxError):
            pass  # closed without a word: killed, say
        s.conn.close()
        s.guest.close()
        self.last_run = time.monotonic()

    def status(self) -> dict[str, Any]:
        def pss(pid: int | None) -> float | None:
            kb = process.pss_kb(pid) if pid else None
            return round(kb / 1024, 1) if kb is not None else None

        with self.changed:
            ready = [{"qemu_pid": g.qemu_pid, "pss_mib": pss(g.qemu_pid), "waiting_s": round(time.monotonic() - g.made, 1)} for g in self.ready]
        launcher_pss = [pss(l.proc.pid) for l in self.launchers.ready]
        return {
            "ok": True, "pid": os.getpid(), "size": self.size, "idle_s": self.idle, "key": self.key, "ready": ready,
            "serving": len(self.serving), "served": self.stats.served, "refills": self.stats.refills, "misses": self.stats.misses, "stale": self.stats.stale,
            "failures": self.stats.failures, "last_error": self.stats.last_error, "pool_pss_mib": pss(os.getpid()),
            "launchers_ready": len(self.launchers.ready), "launcher_pss_mib": launcher_pss[0] if launcher_pss else None,
            "launches": self.launchers.handed, "uptime_s": round(time.time() - self.stats.started, 1),
            "stopping": self.stopping.is_set(), "trees_watched": self.trees.known() if self.trees is not None else [], "memory_mb": self.boot.memory_mb, "accel": self.boot.accel, "kernel": str(self.boot.kernel_image),
        }  # fmt: skip


ASK_TIMEOUT = 5.0  # s for a client to finish a message it began
PREP_JOIN = 90.0  # s for a guest being made to finish before the pool ends


def run_pool(request: RunRequest, size: int, idle: float, before: Callable[[], None] = lambda: None) -> int:
    """The pool's process, until it ends; 0, or 1 if another pool of this user's runs.

    `before` runs once the pool is this user's only one, before it
    listens: the CLI builds the warm-start template there, as `sandbox
    prepare` does (pool guests restore from it; runs meanwhile restore
    their own).
    """
    lock = os.open(lock_path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return 1
    try:
        before()
    except BaseException:
        os.close(lock)
        raise
    path = socket_path()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a killed pool's (we hold the lock: no live pool has it)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o077)
    try:
        unixsock.bind(listener, path)
    finally:
        os.umask(old_umask)
    listener.listen(16)
    listener.setblocking(False)
    try:
        with DirectBackend(request) as backend:
            prep = backend.prepare(request)
            spec = walls.resolve(request.confinement) if request.confinement is not None else None
            boot = boot_spec(request, prep, Plan((), ()), seccomp=spec is not None and spec.seccomp)
            pool = Pool(request, boot, backend, size, idle)
            log.info("pool %d: %d guests of %d MiB, listening on %s", os.getpid(), size, boot.memory_mb, path)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, lambda _s, _f: pool.stop())
            pool.serve(listener)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener.close()
        os.close(lock)
    return 0
