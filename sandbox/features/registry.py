"""Named sandboxes: one directory each under the runtime base, for list, info, logs, wait, stop, kill and rm.

    <runtime base>/sandboxes/<name>/
        record.json   what it runs and how (written at start, completed once QEMU runs)
        lock          flock'ed by its launcher for as long as that lives
        log           stdout and stderr of a detached sandbox
        status        its exit status, once it has ended
        killed        left by `sandbox kill`, or `stop` when its grace ran
                      out, before QEMU is ended: the status is 137
        stop-grace    how long `sandbox stop` gives the command (seconds)
        collected     `sandbox wait` got the status of an entry not kept

A sandbox whose lock nobody holds and that has no status lost its launcher
(`kill -9`): it is stale, and the next command that looks reclaims it
(its QEMU died with the launcher, through the parent-death signal).

An entry not kept (`--rm`, or an unnamed run in the foreground) that has
ended is no longer listed, but stays for `sandbox wait` (and `logs`): the
next command removes it once a waiter has collected its status, or
UNCOLLECTED_GRACE seconds after it ended.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox.core import runtime
from sandbox.core.process import start_ticks
from sandbox.core.errors import EXIT_LAUNCHER, SandboxError, UsageError
from sandbox.backends.base import RunHooks

if TYPE_CHECKING:
    from sandbox.backends.base import Started

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

UNCOLLECTED_GRACE = 60.0  # s an ended entry not kept waits for `sandbox wait`
COLLECTED_GRACE = 1.0  # s more for other waiters woken with the first


class NoSuchSandbox(SandboxError):
    exit_status = 125


@dataclass(frozen=True)
class Record:
    """A sandbox as `list` and `info` show it."""

    name: str
    uuid: str
    argv: tuple[str, ...]
    created: float
    launcher_pid: int
    detached: bool
    keep: bool  # kept after it ends, until `sandbox rm`
    user: str = ""
    qemu_pid: int | None = None
    accel: str = ""
    kernel: str = ""
    memory_mb: int = 0
    cpus: int = 0
    label: str = ""
    shares: tuple[str, ...] = ()
    network: str = "none"
    start: str = ""  # warm or cold
    keyboard: bool = False  # has a virtio keyboard (run --keyboard): send-key goes there
    attached: bool = False  # a QEMU someone else launched (sandbox attach)
    monitor: str = ""  # its QMP socket, for an attached QEMU
    qemu_started: int = 0  # its start time in clock ticks since boot (/proc/PID/stat): a reused pid is not it
    machine: str = ""
    disks: tuple[str, ...] = ()
    x11_display: int | None = None  # --x11: the nested X server on the host (send-key goes there, through XTEST)
    x11_auth: str = ""  # its authority file
    taint: tuple[str, ...] = field(default=())


def base() -> Path:
    path = runtime.runtime_base() / "sandboxes"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise UsageError(f"bad sandbox name {name!r} (letters, digits, '_', '.', '-'; 64 at most)")
    return name


def generated_name() -> str:
    return f"sandbox-{secrets.token_hex(3)}"


# The files of an entry's directory, named here only.
LOCK, RECORD, RECORD_TMP, STATUS, STATUS_TMP = "lock", "record.json", ".record.json", "status", ".status"
KILLED, STOP_GRACE, COLLECTED = "killed", "stop-grace", "collected"  # `sandbox kill`/`stop` was here; how long stop waits; a waiter took the status
LOG, MONITOR, EXEC = "log", "monitor.sock", "exec.sock"  # a detached run's output; QMP for send-key; `sandbox exec`'s socket


class Entry:
    """One named sandbox's directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name
        self._lock_fd = -1
        self._status = EXIT_LAUNCHER
        self.final_status = EXIT_LAUNCHER

    # ---- the launcher's side --------------------------------------------

    @classmethod
    def create(cls, name: str | None, argv: tuple[str, ...], detached: bool, keep: bool) -> Entry:
        """A new entry, locked by this process; a live or kept sandbox of that name is an error."""
        root = base()
        reclaim(root)
        for _ in range(100):
            chosen = check_name(name) if name is not None else generated_name()
            path = root / chosen
            try:
                path.mkdir(mode=0o700)
                break
            except FileExistsError:
                if Entry(path).disposable():  # an ended --rm run that nobody waited for
                    Entry(path).remove()
                    continue
                if name is not None:
                    state = Entry(path).state()
                    what = "a running sandbox" if state == "running" else "an exited sandbox (sandbox rm it first)"
                    raise UsageError(f"the name {name!r} is taken by {what}") from None
        else:
            raise SandboxError("no free sandbox name")
        entry = cls(path)
        entry._lock_fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(entry._lock_fd, fcntl.LOCK_EX)
        try:
            user = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            user = str(os.getuid())
        entry.write(Record(path.name, str(uuid.uuid4()), argv, time.time(), os.getpid(), detached, keep, user=user))
        return entry

    def write(self, record: Record) -> None:
        tmp = self.path / RECORD_TMP
        tmp.write_text(json.dumps(asdict(record)))
        os.replace(tmp, self.path / RECORD)

    def update(self, **fields: Any) -> None:
        self.write(replace(self.record(), **fields))

    # As the run's context manager: the status is recorded on the way out
    # (an exception's exit status when the run failed).

    def __enter__(self) -> Entry:
        self._status = EXIT_LAUNCHER
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        status = exc.exit_status if isinstance(exc, SandboxError) else self._status if exc is None else EXIT_LAUNCHER
        self.final_status = self.finish(status)

    def ended(self, status: int) -> None:
        """The run's exit status, recorded when the entry is left."""
        self._status = status

    def hooks(self, on_started: Callable[[Started], None] | None = None) -> RunHooks:
        """How a run tells this entry about itself."""
        return RunHooks(on_started, self.path / MONITOR, self.path / EXEC, self.stop_grace)

    def finish(self, status: int) -> int:
        """Record the exit status (an entry not kept goes once it is collected: see the module's docstring); the status recorded."""
        if (self.path / KILLED).exists():
            status = 128 + signal.SIGKILL
        try:
            tmp = self.path / STATUS_TMP
            tmp.write_text(f"{status}\n")
            os.replace(tmp, self.path / STATUS)
        except OSError:  # its base was a one-run fallback, already gone
            pass
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        return status

    # ---- everyone's side ----------------------------------------------------

    def record(self) -> Record:
        try:
            raw = json.loads((self.path / RECORD).read_text())
        except (OSError, ValueError) as exc:
            raise NoSuchSandbox(f"no sandbox named {self.name!r}") from exc
        raw["argv"] = tuple(raw["argv"])
        raw["shares"] = tuple(raw.get("shares", ()))
        raw["taint"] = tuple(raw.get("taint", ()))
        raw["disks"] = tuple(raw.get("disks", ()))
        return Record(**raw)

    def stop_grace(self) -> float | None:
        """The seconds `sandbox stop` gives the command (None: no stop was asked)."""
        try:
            return float((self.path / STOP_GRACE).read_text())
        except (OSError, ValueError):
            return None

    def status(self) -> int | None:
        try:
            return int((self.path / STATUS).read_text())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        """Its launcher holds the lock (an attached QEMU: that process still runs)."""
        try:
            record = self.record()
        except NoSuchSandbox:
            record = None
        if record is not None and record.attached:
            return record.qemu_pid is not None and start_ticks(record.qemu_pid) == record.qemu_started
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def state(self) -> str:
        """running, exited, or stale (its launcher is gone without a status)."""
        if self.running():
            return "running"
        return "exited" if self.status() is not None else "stale"

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the sandbox has ended; its status (None if it left none, or still runs after `timeout`)."""
        if self.record().attached:  # no lock to wait on: watch the process
            deadline = None if timeout is None else time.monotonic() + timeout
            while self.running():
                if deadline is not None and time.monotonic() > deadline:
                    return None
                time.sleep(0.05)
            return None
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return self.status()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | (fcntl.LOCK_NB if deadline is not None else 0))
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() > deadline:
                        return None
                    time.sleep(0.05)
        finally:
            os.close(fd)
        return self.status()

    def collect(self) -> None:
        """`sandbox wait` has its status: an entry not kept may go now."""
        with contextlib.suppress(OSError, NoSuchSandbox):
            if not self.record().keep:
                (self.path / COLLECTED).touch()

    def disposable(self) -> bool:
        """It ended, and is not kept: only a waiter may still want its status."""
        try:
            return not self.record().keep and self.status() is not None and not self.running()
        except NoSuchSandbox:
            return False

    def listed(self) -> bool:
        """Whether `list` shows it (an ended entry not kept is gone for it)."""
        return not self.disposable()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def add_attached(record: Record) -> Entry:
    """An entry for a QEMU this program did not start (no lock: its process is its life)."""
    root = base()
    reclaim(root)
    path = root / check_name(record.name)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        raise UsageError(f"the name {record.name!r} is taken (attach --name NAME chooses another)") from None
    entry = Entry(path)
    entry.write(record)
    return entry


def find(name: str) -> Entry:
    root = base()
    reclaim(root)
    entry = Entry(root / check_name(name))
    if not (entry.path / RECORD).exists():
        raise NoSuchSandbox(f"no sandbox named {name!r} (sandbox list --all shows them)")
    return entry


def entries() -> Iterator[Entry]:
    root = base()
    reclaim(root)
    for path in sorted(root.iterdir()):
        if path.is_dir() and (path / RECORD).exists():
            yield Entry(path)


def reclaim(root: Path) -> None:
    """Remove the entries of launchers that died without a status (and half-made ones), and their runtime dirs."""
    runtime.reclaim_stale(root.parent)
    now = time.time()
    for path in root.iterdir():
        entry = Entry(path)
        with contextlib.suppress(OSError):
            if not entry.running() and entry.status() is None:
                age = now - path.stat().st_mtime
                if (path / RECORD).exists() or age > 60:
                    shutil.rmtree(path, ignore_errors=True)
            elif entry.disposable():
                collected = path / COLLECTED
                if now - (path / STATUS).stat().st_mtime > UNCOLLECTED_GRACE or (
                    collected.exists() and now - collected.stat().st_mtime > COLLECTED_GRACE
                ):
                    shutil.rmtree(path, ignore_errors=True)
