"""Host trees served to the guest from erofs images, at the speed of its own memory, and never stale.

Over 9p every lookup, stat and read is a round trip through QEMU, which
under TCG makes file-heavy work (imports, find, du, grep) 5-20x slower
than the same work on a tmpfs in the guest.  For a few read-only trees
(`--image-tree`; by default the host's C headers and system Python
libraries) the launcher keeps an erofs image of the tree in the user's
cache, built in the background by `mkfs.erofs` as the user, from what the
user can read.  The guest mounts it over the 9p tree (through a loop
device on the image file, which it reads over the same read-only 9p root
in large chunks), so lookups and reads stay in the guest.

Never stale: an image is used only while the tree is exactly what it was
built from.  Its fingerprint covers every entry (device, inode, type and
mode, owner, size, link count, mtime and ctime, in ns): a directory's mtime
changes with every entry made, removed or renamed in it, a file's ctime
with every write or change of mode, owner or times, and ctime cannot be
set back (short of the host's clock).  A run compares the tree's
fingerprint now with the image's; any difference and the tree comes over
9p as it does without an image, while a new image is built in the
background.  The fingerprint of a build is taken only when every entry's
last change is RACY_NS old (a coarse clock may give two changes one
timestamp: git's "racily clean" rule), and again after the build: a tree
that changed meanwhile gets no image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from sandbox.core import cache
from sandbox.wire.protocol import MOP_IMAGE, MOP_MKDIR, MountStep

log = logging.getLogger(__name__)

FORMAT = 3  # bump when an image's contents or its manifest change meaning
RACY_NS = 20_000_000  # as freshness.RACY_NS: a change within a clock tick of the fingerprint could hide
SETTLE_TRIES = 50
MAX_ENTRIES = 30_000  # a larger tree costs a run too much to fingerprint (~5 us an entry)
MAX_BYTES = 2 << 30  # nor is a larger one worth its disk
CHUNK = 1 << 20  # bytes of a file's data per chunk of the blob (identical chunks are stored once)
JUDGE_TIMEOUT = 5.0  # s a run waits for its trees' check before it goes on without images
PRUNE_AFTER = 600.0  # s an image no longer current is kept (a run that chose it may not have opened it yet)
# A tree that changed while its image was built (a log written to, a cache
# in it) is not built again for this long: each run would otherwise start a
# build that ends the same way, all of the tree's bytes read for nothing.
CHANGED_WHILE_BUILT = "it changed while its image was built"
REBUILD_AFTER = 300.0


def default_trees() -> tuple[str, ...]:
    """The trees imaged unless told otherwise: C headers and the standard libraries of the system's Pythons, where the host has them.

    Not /usr/lib/python3 (Debian's dist-packages: 14,000 entries here, a
    fingerprint of ~70 ms each run): --image-tree adds it, or any tree.
    """
    found = ["/usr/include"]
    try:
        names = sorted(os.listdir("/usr/lib"))
    except OSError:
        names = []
    found += [os.path.join("/usr/lib", n) for n in names if n.startswith("python3.")]
    return tuple(p for p in found if os.path.isdir(p) and not os.path.islink(p))


# ---- which trees a run can take (pure) ----------------------------------------


def _overlaps(a: str, b: str) -> bool:
    a, b = a.rstrip("/") or "/", b.rstrip("/") or "/"
    return a == b or a.startswith(b if b.endswith("/") else b + "/") or b.startswith(a if a.endswith("/") else a + "/")


# What the guest mounts of its own (the init: procfs, sysfs, devtmpfs; the plan: tmpfs on /run, /tmp): never an image there.
GUEST_OWN = ("/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp")


def refusal(tree: str) -> str | None:
    """Why `tree` (absolute, resolved) can never be imaged (None: it can)."""
    if tree == "/":
        return "the whole root cannot be one image"
    if any(_overlaps(tree, own) for own in GUEST_OWN):
        return "the guest mounts a filesystem of its own there"
    return None


def usable_trees(trees: Iterable[str], steps: Sequence[MountStep], homes: Iterable[str]) -> tuple[str, ...]:
    """The trees an image may cover in this run: none that meets a mount of the plan or a home.

    An image mounted over a tree hides whatever else the plan puts in it
    (an overlay, a share, a hidden secret), and a home's secrets must stay
    hidden; a nested tree goes with its outer one.
    """
    blocked = [m.path for m in steps] + [h for h in homes if h and h != "/"]
    chosen: list[str] = []
    for tree in sorted(set(trees), key=len):
        if refusal(tree) is not None or any(_overlaps(tree, b) for b in blocked) or any(_overlaps(tree, c) for c in chosen):
            continue
        chosen.append(tree)
    return tuple(chosen)


def image_steps(images: Sequence[tuple[str, str]]) -> tuple[MountStep, ...]:
    """Mount steps for (tree, image path) pairs, done before the rest of the plan."""
    return tuple(MountStep(MOP_IMAGE, tree, tag=image) for tree, image in images)


def with_images(steps: Sequence[MountStep], images: Sequence[tuple[str, str]]) -> tuple[MountStep, ...]:
    """The plan with its image steps first (after the root's own mkdirs)."""
    mkdirs = tuple(m for m in steps if m.op == MOP_MKDIR)
    return mkdirs + image_steps(images) + tuple(m for m in steps if m.op != MOP_MKDIR)


# ---- fingerprints ----------------------------------------------------------------


@dataclass(frozen=True)
class Scan:
    """A tree's fingerprint: a digest over every entry, their count and bytes, and its newest change (ns)."""

    digest: str
    entries: int
    bytes: int
    newest_ns: int
    readable: bool  # every file and directory readable (and directories searchable) by this process


# Every entry's identity and times as find(1) prints them: walked in C, in a
# process of its own (on the other core while QEMU starts; a walk in Python
# held the GIL the launcher needs then, and took as long).  Directories first
# are not needed: any change to an entry changes its own line.
FIND_FORMAT = "%P\\0%y %D %i %m %U %G %s %n %T@ %C@\\0"


def scan(tree: str, limit: int = MAX_ENTRIES) -> Scan | None:
    """The fingerprint of `tree` as it is now, with what a build needs to know of it; None: no directory, or over `limit` entries."""
    proc = _finding(tree)
    if proc is None:
        return None
    out, _ = proc.communicate(timeout=600)
    fields = out.split(b"\0")[1::2]
    if len(fields) > limit + 1:
        return None
    # An entry find could not read (a directory, say) makes the tree unreadable for this user.
    readable = proc.returncode == 0
    total = newest = 0
    for line in fields:
        kind, _dev, _ino, mode, uid, gid, size, _nlink, mtime, ctime = line.split(b" ")
        newest = max(newest, _ns(mtime), _ns(ctime))
        if kind == b"f":
            total += int(size)
            readable = readable and _readable(int(mode, 8), int(uid), int(gid), 0o4)
        elif kind == b"d":
            readable = readable and _readable(int(mode, 8), int(uid), int(gid), 0o5)
    return Scan(hashlib.sha256(out).hexdigest(), len(fields) - 1, total, newest, readable)


def _ns(text: bytes) -> int:
    whole, _, frac = text.partition(b".")
    return int(whole) * 1_000_000_000 + int((frac + b"000000000")[:9])


def _readable(mode: int, uid: int, gid: int, want: int) -> bool:
    """Whether this process may read (and for directories search) an entry, as the kernel would decide (root: always)."""
    if os.geteuid() == 0:
        return True
    if uid == os.geteuid():
        bits = mode >> 6
    elif gid == os.getegid() or gid in os.getgroups():
        bits = mode >> 3
    else:
        bits = mode
    return bits & want == want


def settled_scan(tree: str, clock: Callable[[], int] = time.time_ns, sleep: Callable[[float], None] = time.sleep) -> Scan | None:
    """scan(tree), taken when no entry changed within RACY_NS of it (None: it never settled, or no tree)."""
    for _ in range(SETTLE_TRIES):
        found = scan(tree)
        if found is None:
            return None
        if clock() - found.newest_ns >= RACY_NS:
            return found
        sleep(RACY_NS / 1e9)
    return None


# ---- the cache ---------------------------------------------------------------------


def images_dir() -> Path:
    path = cache.cache_dir() / "files"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def tree_key(tree: str) -> str:
    return cache.content_hash(str(FORMAT).encode(), tree.encode("utf-8", "surrogateescape"))


@dataclass(frozen=True)
class Manifest:
    """What the cache holds for one tree: its current image (or why none), and the fingerprint it was built from."""

    format: int
    tree: str
    digest: str
    image: str  # file name in images_dir(), "" if the build failed
    entries: int
    bytes: int
    image_bytes: int
    build_seconds: float
    build_cpu_seconds: float
    built_at: float
    error: str = ""
    # The image and blob as written (inode, size, mtime, ctime): a write to either since (a run given the
    # cache read-write, say) changes ctime, and the image is not used again.
    files: tuple[tuple[int, int, int, int], ...] = ()


def manifest_path(tree: str) -> Path:
    return images_dir() / f"{tree_key(tree)}.json"


def read_manifest(tree: str) -> Manifest | None:
    try:
        data = json.loads(manifest_path(tree).read_text())
        data["files"] = tuple(tuple(f) for f in data.get("files", ()))
        m = Manifest(**data)
    except (OSError, ValueError, TypeError):
        return None
    return m if m.format == FORMAT and m.tree == tree else None


@dataclass(frozen=True)
class Verdict:
    """One tree's state for a run: its image if current, else why not and whether to build one."""

    tree: str
    image: str | None
    why: str
    build: bool


def _finding(tree: str) -> subprocess.Popen[bytes] | None:
    """find(1) printing FIND_FORMAT for `tree`, started (None: no directory there)."""
    try:
        if not stat.S_ISDIR(os.lstat(tree).st_mode):
            return None
        return subprocess.Popen(["find", tree, "-printf", FIND_FORMAT], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env={"LC_ALL": "C", "PATH": os.defpath})  # fmt: skip
    except OSError:
        return None


def digests(trees: Sequence[str], limit: int = MAX_ENTRIES) -> dict[str, str | None]:
    """scan(tree).digest for each tree, all walked at once and nothing else read (a run's check); None: no tree, or too large."""
    running = {tree: _finding(tree) for tree in trees}
    out: dict[str, str | None] = {}
    for tree, proc in running.items():
        if proc is None:
            out[tree] = None
            continue
        data, _ = proc.communicate(timeout=600)
        out[tree] = hashlib.sha256(data).hexdigest() if data.count(b"\0") <= 2 * (limit + 1) else None
    return out


def verdict(tree: str) -> Verdict:
    """judge(tree) against the tree as it is now."""
    return judge(tree, digests([tree])[tree])


def judge(tree: str, now: str | None) -> Verdict:
    """Whether `tree` has an image matching its fingerprint `now` (complete: see the module's docstring)."""
    m = read_manifest(tree)
    if now is None:
        return Verdict(tree, None, "not a directory, or too large to image", False)
    if m is None:
        return Verdict(tree, None, "no image yet", True)
    if not m.image and m.error == CHANGED_WHILE_BUILT:
        if time.time() - m.built_at < REBUILD_AFTER:
            return Verdict(tree, None, f"{m.error}: not built again for {REBUILD_AFTER:g} s", False)
        return Verdict(tree, None, m.error, True)
    if m.digest != now:
        return Verdict(tree, None, "changed since its image was built", True)
    if not m.image:
        return Verdict(tree, None, f"its image could not be built: {m.error}", False)
    path = images_dir() / m.image
    now_files = file_stats(path)
    if now_files is None:
        return Verdict(tree, None, "its image is gone", True)
    if now_files != m.files:
        return Verdict(tree, None, "its image was changed since it was built", True)
    return Verdict(tree, str(path), "current", False)


def current_images(trees: Iterable[str], start_builds: bool = True) -> list[tuple[str, str]]:
    """(tree, image path) for each tree whose image is current; a build is started in the background for the others."""
    found: list[tuple[str, str]] = []
    stale: list[str] = []
    trees = list(trees)
    now = digests(trees)
    for tree in trees:
        v = judge(tree, now[tree])
        log.debug("image of %s: %s", tree, v.why)
        if v.image is not None and ":" not in v.image:  # a ':' would end the mount step's field
            found.append((tree, v.image))
        elif v.build:
            stale.append(tree)
    if stale and start_builds:
        start_build(stale)
    return found


class Judging:
    """current_images(trees) in a thread of its own, from construction to `result()`: a run fingerprints while QEMU starts."""

    def __init__(self, trees: Sequence[str], ask: Callable[[list[str]], tuple[dict[str, str], list[str]]] | None = None) -> None:
        self._found: list[tuple[str, str]] = []
        self._thread = threading.Thread(target=self._judge, args=(tuple(trees), ask), name="sandbox-images", daemon=True)
        self._thread.start()

    def _judge(self, trees: tuple[str, ...], ask: Callable[[list[str]], tuple[dict[str, str], list[str]]] | None) -> None:
        """The trees the pool's watcher vouches for (`ask`: at once), then the rest by walking them."""
        try:
            known, decided = ask(list(trees)) if ask is not None else ({}, [])
            found = [(t, known[t]) for t in trees if t in known and ":" not in known[t]]
            self._found = found + current_images([t for t in trees if t not in decided])
        except Exception as exc:  # noqa: BLE001 - no image is always a correct answer
            log.info("images not judged: %s", exc)

    def result(self, timeout: float = JUDGE_TIMEOUT) -> list[tuple[str, str]]:
        """The trees with a current image; none if the check did not end in `timeout` s (a tree on a hung mount, say)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.info("images not judged in %g s: the trees come over 9p", timeout)
            return []
        return self._found


def start_build(trees: Sequence[str]) -> None:
    """Build images of `trees` in a process of its own, at the lowest priority, never waited for."""
    try:
        # Nothing of the run's: not its runtime dir (by environment or working
        # directory, a pool's stop would take it for one of its own), nor its session.
        env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
        subprocess.Popen(
            [sys.executable, "-m", "sandbox.image.hostfiles", *trees],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/", env=env,
            start_new_session=True, close_fds=True, preexec_fn=background_priority,
        )  # fmt: skip
    except OSError as exc:
        log.info("cannot start an image build: %s", exc)


def background_priority() -> None:
    """The calling thread (Linux: both calls take 0 as it) at the lowest priority: a build or a walk never slows a run."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def build(tree: str) -> Manifest | None:
    """Build `tree`'s image unless one is current (after any build of it under way); the manifest written, or None."""
    import fcntl

    d = images_dir()
    key = tree_key(tree)
    lock = os.open(d / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        # Waits for a build under way (a run started one): then its image is
        # current, or the tree changed since and this build makes the next.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if verdict(tree).image is not None:
            return read_manifest(tree)
        manifest = _build_locked(tree, d, key)
        if manifest is not None:
            cache.write_atomic(d / f"{key}.json", json.dumps(asdict(manifest)).encode(), 0o600)
        prune(d)
        return manifest
    finally:
        os.close(lock)


def _build_locked(tree: str, d: Path, key: str) -> Manifest | None:
    mkfs = shutil.which("mkfs.erofs") or next((p for p in ("/usr/sbin/mkfs.erofs", "/sbin/mkfs.erofs") if os.path.exists(p)), None)
    before = settled_scan(tree)
    if before is None:
        return None
    started, cpu0 = time.monotonic(), os.times()

    def failed(why: str) -> Manifest:
        return Manifest(FORMAT, tree, before.digest, "", before.entries, before.bytes, 0, 0.0, 0.0, time.time(), why)

    if mkfs is None:
        return failed("mkfs.erofs is not installed (apt-get install erofs-utils)")
    if mapped_for_writing(tree):
        # A page already dirty in a shared writable mapping takes more writes
        # without a new ctime: no image while one is mapped (the next run asks again).
        log.info("image of %s: a file of it is mapped for writing; not now", tree)
        return None
    if not before.readable:
        return failed("some of it is not readable by this user")
    if before.bytes > MAX_BYTES:
        return failed(f"larger than {MAX_BYTES >> 20} MiB")
    name = f"{key}-{before.digest[:16]}.erofs"
    tmp, tmp_blob = d / f".tmp-{name}", d / f".tmp-{blob_name(name)}"
    try:
        # --preserve-mtime: timestamps as the host has them (Python's .pyc and make compare them).
        # --blobdev: file data in a blob of its own, so that the metadata (inodes and
        # directories) is one small contiguous image: erofs-utils 1.5 otherwise puts
        # each inode beside its file's data, and a du read 8,800 scattered blocks.
        argv = [mkfs, "--quiet", "--preserve-mtime", f"--blobdev={tmp_blob}", f"--chunksize={CHUNK}", str(tmp), tree]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            return failed(" ".join((proc.stderr or proc.stdout).split())[:300] or f"mkfs.erofs exited {proc.returncode}")
        after = scan(tree)
        if after is None or after.digest != before.digest:
            return failed(CHANGED_WHILE_BUILT)  # no image; runs ask again after REBUILD_AFTER (judge)
        for f in (tmp, tmp_blob):
            os.chmod(f, 0o600)
        os.replace(tmp_blob, d / blob_name(name))  # the blob first: an image is never named without its blob
        os.replace(tmp, d / name)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_blob.unlink(missing_ok=True)
    cpu1 = os.times()
    cpu = (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)
    files = file_stats(d / name) or ()
    size = sum(f[1] for f in files)
    return Manifest(FORMAT, tree, before.digest, name, before.entries, before.bytes, size,
                    round(time.monotonic() - started, 3), round(cpu, 3), time.time(), files=files)  # fmt: skip


def file_stats(image: Path) -> tuple[tuple[int, int, int, int], ...] | None:
    """(inode, size, mtime, ctime) of an image and its blob; None if either is missing or no regular file."""
    out = []
    for p in (image, image.with_name(blob_name(image.name))):
        try:
            st = os.lstat(p)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def mapped_for_writing(tree: str, proc: str = "/proc") -> bool:
    """Whether any process this one can see has a file of `tree` in a shared writable mapping (its maps' "rw-s" lines)."""
    prefix = tree.rstrip("/") + "/"
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/maps", "rb") as f:
                for line in f:
                    fields = line.split(None, 5)
                    if len(fields) == 6 and fields[1][:2] == b"rw" and fields[1][3:4] == b"s" and fields[5].startswith(prefix.encode()):
                        return True
        except OSError:
            continue  # gone, or another user's
    return False


def blob_name(image: str) -> str:
    """The file with an image's data beside its metadata (guest-init/images.c finds it by the same rule)."""
    return image.removesuffix(".erofs") + ".blob"


def prune(d: Path, now: float | None = None) -> list[Path]:
    """Remove images no manifest names, once PRUNE_AFTER old (a run that chose one may still be opening it)."""
    now = time.time() if now is None else now
    named = set()
    for m in d.glob("*.json"):
        try:
            named.add(json.loads(m.read_text()).get("image", ""))
        except (OSError, ValueError, AttributeError):
            continue
    gone = []
    for img in [*d.glob("*.erofs"), *d.glob("*.blob")]:
        try:
            image = img.name if img.suffix == ".erofs" else img.name.removesuffix(".blob") + ".erofs"
            if image not in named and now - img.stat().st_mtime > PRUNE_AFTER:
                img.unlink()
                gone.append(img)
        except OSError:
            continue
    return gone


def main(argv: Sequence[str]) -> int:
    """python -m sandbox.image.hostfiles TREE...: build each tree's image (the background builder)."""
    for tree in argv:
        try:
            m = build(tree)
        except Exception as exc:  # noqa: BLE001 - a background build must never leave a traceback anywhere
            log.info("image of %s: %s", tree, exc)
            continue
        if m is not None:
            log.info("image of %s: %s", tree, m.image or m.error)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
