"""Guest templates for warm start: a guest snapshotted once, restored by every run.

A template is taken where the guest init waits for its spec (it stamps
"ready"): the kernel has booted and the modules are loaded, but nothing of
any run (command, environment, files, 9p mounts) has entered the guest.
It is two files in the cache, keyed by everything that shapes the guest:

- `ram`: guest RAM, sparse.  Each run gets it as a sealed memfd that QEMU
  maps privately (copy-on-write): QEMU 7.2 opens a RAM file read-write
  even for a private mapping, and a write seal is what keeps a confined
  QEMU from changing what other sandboxes start from.  Sandboxes running
  at the same time share one memfd's pages (see `Holders`).
- `state`: the device state (~100 KB), QEMU's migration stream without
  RAM (x-ignore-shared), fed to `-incoming fd:N`.

A template that is missing, half-written, truncated, from another format
or another QEMU is never used: the run boots cold and rebuilds it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox.core import cache, progress
from sandbox.core.errors import SandboxError

if TYPE_CHECKING:
    from sandbox.backends.direct.monitor import Monitor

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what a template holds, or how it is made, changes
KEEP = 4  # templates kept besides idle-day pruning (each is ~50-100 MB of RAM data)
MIGRATE_TIMEOUT = 60.0
# RAM in a file stays out of the migration stream: a template's device
# state is ~100 KB, and its RAM is the file.
IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}


class TemplateError(SandboxError):
    """A template could not be made or used; the run goes on cold."""


def key(canonical_argv: list[str], identities: dict[str, str]) -> str:
    """The template key: QEMU's argv with run-specific values replaced, plus file identities."""
    blob = json.dumps({"format": FORMAT, "argv": canonical_argv, "files": identities}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def templates_dir() -> Path:
    path = cache.cache_dir() / "templates"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


@dataclass(frozen=True)
class Manifest:
    """What a template is; written last, so a template without one is unfinished."""

    format: int
    key: str
    memory_bytes: int
    ram_data_bytes: int
    state_bytes: int
    state_sha256: str
    build_seconds: float
    qemu_version: str
    created: float


@dataclass(frozen=True)
class Template:
    key: str
    path: Path
    manifest: Manifest

    @property
    def ram(self) -> Path:
        return self.path / "ram"

    @property
    def state(self) -> Path:
        return self.path / "state"


def _sha256_fd(fd: int) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
        size += len(chunk)
    os.lseek(fd, 0, os.SEEK_SET)
    return size, h.hexdigest()


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the parts of a sparse file that hold data."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size) - start
        pos = end


PAGE = 4096
_ZERO_PAGE = bytes(PAGE)


_libc = ctypes.CDLL(None, use_errno=True)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free a range of a file's pages (reads give zeros again); os has no fallocate modes."""
    if _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


def copy_nonzero_pages(src: int, dst: int, size: int, punch: bool = False) -> int:
    """Copy the pages of `src` that are not all zeros into `dst` (already `size` long); returns bytes copied.

    With `punch`, the zero pages of `src` are freed as they are found:
    `src` is the guest RAM of a paused guest that zeroed its free memory,
    and once it runs on, QEMU need not keep those pages resident.
    """
    copied = 0
    chunk = 1 << 20
    zero_chunk = bytes(chunk)
    zeros_from = -1  # start of the current run of zero pages (punch)

    def zero_run_ends(at: int) -> None:
        nonlocal zeros_from
        if punch and zeros_from >= 0 and at > zeros_from:
            punch_hole(src, zeros_from, at - zeros_from)
        zeros_from = -1

    for start, length in data_extents(src, size):
        zero_run_ends(start)
        pos = start
        while pos < start + length:
            data = os.pread(src, min(chunk, start + length - pos), pos)
            if not data:
                break
            if data == zero_chunk[: len(data)]:
                if zeros_from < 0:
                    zeros_from = pos
            else:
                view = memoryview(data)
                for off in range(0, len(data), PAGE):
                    page = view[off : off + PAGE]
                    if page != _ZERO_PAGE[: len(page)]:
                        zero_run_ends(pos + off)
                        os.pwrite(dst, page, pos + off)
                        copied += len(page)
                    elif zeros_from < 0:
                        zeros_from = pos + off
            pos += len(data)
        zero_run_ends(pos)
    return copied


def copy_data(src: int, dst: int, size: int) -> int:
    """Copy the data of sparse `src` into `dst` (already `size` long), keeping holes; returns bytes copied."""
    copied = 0
    for start, length in data_extents(src, size):
        os.lseek(dst, start, os.SEEK_SET)
        done = 0
        while done < length:
            n = os.sendfile(dst, src, start + done, length - done)
            if n <= 0:
                raise OSError(errno.EIO, "short copy of template RAM")
            done += n
        copied += length
    return copied


class Store:
    """The template for one key in the cache."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.root = templates_dir()
        self.path = self.root / key

    def load(self, memory_bytes: int) -> Template | None:
        """The finished template, checked; None (and the bad one removed) if there is none to use."""
        try:
            raw = json.loads((self.path / "manifest.json").read_text())
            manifest = Manifest(**raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            self.invalidate(f"unreadable manifest ({exc})")
            return None
        problem = self._check(manifest, memory_bytes)
        if problem:
            self.invalidate(problem)
            return None
        self._touch()
        return Template(self.key, self.path, manifest)

    def _check(self, m: Manifest, memory_bytes: int) -> str | None:
        if m.format != FORMAT or m.key != self.key:
            return "made by another version"
        if m.memory_bytes != memory_bytes:
            return "made for another memory size"
        try:
            if (self.path / "ram").stat().st_size != memory_bytes:
                return "RAM file truncated"
            if (self.path / "state").stat().st_size != m.state_bytes:
                return "device state truncated"
        except OSError as exc:
            return f"missing file ({exc.strerror})"
        return None

    def _touch(self) -> None:
        # The manifest's mtime is the template's last use (refreshed at most daily).
        manifest = self.path / "manifest.json"
        with contextlib.suppress(OSError):
            if time.time() - manifest.stat().st_mtime > 86400:
                os.utime(manifest)

    def invalidate(self, reason: str) -> None:
        """Take the template away at once (a rename), then delete it."""
        log.info("template %s unusable (%s); it will be rebuilt", self.key, reason)
        trash = self.root / f".trash-{self.key}-{os.getpid()}"
        try:
            os.rename(self.path, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    FAILED_RETRY_S = 86400.0  # a build that failed is not tried again for a day (its inputs are in the key)

    def mark_failed(self, reason: str) -> None:
        """Remember that building this template failed, so that the next runs do not pay for it again."""
        log.info("template %s could not be built (%s); not retried for a day", self.key, reason)
        with contextlib.suppress(OSError):
            (self.root / f"{self.key}.failed").write_text(reason + "\n")

    def failed_recently(self) -> bool:
        try:
            return time.time() - (self.root / f"{self.key}.failed").stat().st_mtime < self.FAILED_RETRY_S
        except OSError:
            return False

    def try_lock(self) -> int | None:
        """The build lock's descriptor, for the one launcher that may build; None while another holds it."""
        fd = os.open(self.root / f"{self.key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd


class Builder:
    """Takes the snapshot when the guest is ready (DirectGuest calls `take`), then lets the run go on."""

    def __init__(self, store: Store, memory_bytes: int, qemu_version: str, lock_fd: int) -> None:
        self.store = store
        self.memory_bytes = memory_bytes
        self.qemu_version = qemu_version
        self.lock_fd = lock_fd
        self.started = time.monotonic()
        # Guest RAM while building: QEMU writes it through (share=on), and
        # the launcher copies it out while the guest is paused.
        self.ram_fd = os.memfd_create(f"sandbox-template-{store.key}", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, memory_bytes)
        self.built: Template | None = None
        progress.show("building the warm-start template")

    @classmethod
    def try_start(cls, store: Store, memory_bytes: int, qemu_version: str) -> Builder | None:
        """A builder if this launcher may build the template now (none exists, nobody else builds it, no recent failure)."""
        if store.failed_recently():
            return None
        try:
            lock = store.try_lock()
        except OSError as exc:
            log.info("cannot build a template: %s", exc)
            return None
        if lock is None:
            return None
        if store.load(memory_bytes) is not None:  # finished while we looked
            os.close(lock)
            return None
        try:
            return cls(store, memory_bytes, qemu_version, lock)
        except OSError:
            os.close(lock)
            raise

    def __enter__(self) -> Builder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        progress.clear()
        if self.lock_fd >= 0 and self.built is None and not self.store.path.exists():
            # A build that failed leaves no lock for a template that never was.
            with contextlib.suppress(OSError):
                (self.store.root / f"{self.store.key}.lock").unlink()
        for name in ("ram_fd", "lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def take(self, qmp: Monitor) -> None:
        """Save the guest's device state and RAM into the cache (QEMU pauses it meanwhile), then resume it."""
        tmp = self.store.root / f".build-{self.store.key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        try:
            # Migrated while running: the saved run state is "running", so a
            # restore resumes the guest by itself, without a "cont" round
            # trip.  The RAM is not copied, so QEMU pauses the guest for the
            # device state at once; it stays paused until "cont".
            try:
                self._save(qmp, tmp)
            finally:
                qmp.execute("cont", 5.0)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            self.close()  # the RAM copy and the lock are done with; the guest goes on

    def _save(self, qmp: Monitor, tmp: Path) -> None:
        state_fd = os.open(tmp / "state", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            qmp.execute("migrate-set-capabilities", 5.0, IGNORE_SHARED)
            qmp.send_fd(state_fd, "template-state", 5.0)
            qmp.execute("migrate", 5.0, {"uri": "fd:template-state"})
            deadline = time.monotonic() + MIGRATE_TIMEOUT
            while True:
                info = qmp.execute("query-migrate", 5.0)
                status = info.get("status") if isinstance(info, dict) else None
                if status == "completed":
                    break
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise TemplateError(f"saving the device state: migration {status or 'timed out'}: {info}")
                time.sleep(0.005)
            state_bytes, state_sha = _sha256_fd(state_fd)
        finally:
            os.close(state_fd)
        ram = os.open(tmp / "ram", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(ram, self.memory_bytes)
            data = copy_nonzero_pages(self.ram_fd, ram, self.memory_bytes, punch=True)
        finally:
            os.close(ram)
        manifest = Manifest(
            format=FORMAT,
            key=self.store.key,
            memory_bytes=self.memory_bytes,
            ram_data_bytes=data,
            state_bytes=state_bytes,
            state_sha256=state_sha,
            build_seconds=round(time.monotonic() - self.started, 3),
            qemu_version=self.qemu_version,
            created=time.time(),
        )
        (tmp / "manifest.json").write_text(json.dumps(asdict(manifest), indent=1))
        try:
            os.rename(tmp, self.store.path)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another launcher finished one first
            return
        self.built = Template(self.store.key, self.store.path, manifest)
        log.info("template %s built: %d MiB of RAM data, %d KiB of device state", self.store.key, data >> 20, state_bytes >> 10)


SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


FILL_WAIT = 2.0  # s: longer than any fill; past it, copy without waiting


def _lock(path: Path, wait: float) -> int:
    """An exclusive flock on `path`, waited for at most `wait` seconds; -1 if not had."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return -1
            time.sleep(0.005)


class Holders:
    """Launchers whose run holds a filled, sealed memfd of a template's RAM.

    Sandboxes running at the same time share one such memfd, and so its
    pages, instead of each copying the template.  Each holder is a file
    `<pid>` holding "<fd> <dev> <ino>"; a newcomer opens that descriptor
    through /proc and checks that it is the same sealed memfd (a holder
    that died, or a reused pid, fails the check and is removed).
    """

    def __init__(self, root: Path, key: str) -> None:
        self.dir = root / f"{key}.holders"
        self.mine: Path | None = None

    def borrow(self) -> int | None:
        """A descriptor of a live holder's memfd, or None."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return None
        for name in names:
            entry = self.dir / name
            try:
                fd_no, dev, ino = (int(x) for x in entry.read_text().split())
                fd = os.open(f"/proc/{int(name)}/fd/{fd_no}", os.O_RDONLY | os.O_CLOEXEC)
            except (OSError, ValueError):
                if not name.isdigit() or not _alive(int(name)):
                    with contextlib.suppress(OSError):
                        entry.unlink()
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (dev, ino) and fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS:
                return fd
            os.close(fd)
        return None

    def register(self, fd: int) -> None:
        st = os.fstat(fd)
        with contextlib.suppress(FileExistsError):
            self.dir.mkdir(mode=0o700)
        entry = self.dir / str(os.getpid())
        tmp = self.dir / f".{os.getpid()}"
        tmp.write_text(f"{fd} {st.st_dev} {st.st_ino}")
        os.replace(tmp, entry)
        self.mine = entry

    def unregister(self) -> None:
        if self.mine is not None:
            with contextlib.suppress(OSError):
                self.mine.unlink()
            self.mine = None


class RestoreRam:
    """The template's RAM for one run: a memfd of the right size at once, its data filled in later.

    QEMU only needs the file to exist when it starts; it touches guest RAM
    only once the guest runs.  So the launcher starts QEMU first and
    copies the data while QEMU initialises, then seals the memfd: QEMU may
    map it privately, never change it.  When another running sandbox
    already holds one, that one is used and nothing is copied.
    """

    def __init__(self, template: Template, root: Path) -> None:
        self.template = template
        self.size = template.manifest.memory_bytes
        self.holders = Holders(root, template.key)
        self.fd = -1
        self.lock = -1
        borrowed = self._borrow()
        if borrowed is None:
            # Sandboxes started together: one fills, the others wait for
            # it (tens of ms) and share its memfd instead of copying.
            self.lock = _lock(root / f"{template.key}.lock-ram", FILL_WAIT)
            borrowed = self._borrow()
        self.shared = borrowed is not None
        if borrowed is not None:
            self._unlock()
            self.fd = borrowed
            return
        try:
            self.fd = os.memfd_create(f"sandbox-ram-{template.key}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(self.fd, self.size)
        except BaseException:
            self.close()
            raise

    def _borrow(self) -> int | None:
        try:
            return self.holders.borrow()
        except OSError as exc:
            log.debug("no shared template RAM: %s", exc)
            return None

    def _unlock(self) -> None:
        if self.lock >= 0:
            os.close(self.lock)
            self.lock = -1

    def fill(self) -> None:
        """Copy the template's RAM data in and seal the memfd (before the guest runs)."""
        if self.shared:
            return
        src = os.open(self.template.ram, os.O_RDONLY | os.O_CLOEXEC)
        try:
            copy_data(src, self.fd, self.size)
        finally:
            os.close(src)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
        try:
            self.holders.register(self.fd)
        except OSError as exc:
            log.debug("cannot offer the template RAM to other sandboxes: %s", exc)
        finally:
            self._unlock()

    def __enter__(self) -> RestoreRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._unlock()
        self.holders.unregister()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


SIDE_FILES = (".lock", ".lock-ram", ".holders", ".failed")


def prune(in_use: str | None) -> list[Path]:
    """Delete templates idle for cache.IDLE_DAYS or beyond the KEEP most recently used, and leftovers of dead builders."""
    root = templates_dir()
    now = time.time()
    removed: list[Path] = []
    entries: list[tuple[float, Path]] = []
    for p in root.iterdir():
        name = p.name
        if name.startswith((".build-", ".trash-")):
            pid = name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            continue
        if name.endswith(SIDE_FILES):
            # Locks and holder lists of templates long gone.  (Unlinking a
            # lock someone holds is harmless: two builders would both
            # build, and the second's rename finds the first's template.)
            owner = root / name.rsplit(".", 1)[0]
            with contextlib.suppress(OSError):
                if not owner.exists() and now - p.stat().st_mtime > cache.IDLE_DAYS * 86400:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    removed.append(p)
            continue
        if not p.is_dir():
            continue
        try:
            used = (p / "manifest.json").stat().st_mtime
        except OSError:
            used = p.stat().st_mtime
        entries.append((used, p))
    entries.sort(reverse=True)
    for i, (used, p) in enumerate(entries):
        if p.name == in_use:
            continue
        if i >= KEEP or now - used > cache.IDLE_DAYS * 86400:
            shutil.rmtree(p, ignore_errors=True)
            for suffix in SIDE_FILES:
                side = root / f"{p.name}{suffix}"
                with contextlib.suppress(OSError):
                    shutil.rmtree(side) if side.is_dir() else side.unlink()
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
