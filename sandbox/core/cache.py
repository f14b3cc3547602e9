"""The on-disk cache under $XDG_CACHE_HOME/sandbox, keyed by content or file identity."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

from sandbox.core.errors import SandboxError


def cache_dir() -> Path:
    """The cache directory, created on first use."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "sandbox"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as exc:
        raise SandboxError(f"cannot create the cache directory {path}: {exc.strerror} (set XDG_CACHE_HOME)") from exc
    return path


def state_dir() -> Path:
    """$XDG_STATE_HOME/sandbox: what is remembered for this user that is not a cache (not created here)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sandbox"


def file_identity(path: Path) -> str:
    """A short key that changes whenever the file is replaced or rewritten.

    Hashing a kernel image on every start would cost more than the cache
    saves, so large inputs are keyed by (device, inode, size, mtime) as make
    does; package upgrades replace the file and so change the key.
    """
    st = path.stat()
    ident = f"{path.resolve()}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def content_hash(*parts: bytes) -> str:
    """A short sha256 key over some byte strings."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# Boot images are the large entries (30 MB for a packed kernel, 1-2 MB
# for an initramfs or a static init); each kernel upgrade or sandbox
# upgrade leaves the old ones behind.
BOOT_IMAGES = ("vmlinux-*.pvh", "initramfs-*.cpio", "init-*")
IDLE_DAYS = 7
_DAY = 86400.0


def prune_boot_images(in_use: list[Path], idle_days: float = IDLE_DAYS) -> list[Path]:
    """Mark `in_use` as used today and delete boot images nobody used for `idle_days`.

    An entry's mtime is its last use (refreshed at most daily, so a run
    costs a stat, not a write); another launcher that still uses an old
    entry keeps it alive the same way.  Returns what was deleted.
    """
    now = time.time()
    keep = {p.resolve() for p in in_use}
    for p in keep:
        try:
            if now - p.stat().st_mtime > _DAY:
                os.utime(p)
        except OSError:
            pass
    removed: list[Path] = []
    base = cache_dir()
    for pattern in BOOT_IMAGES:
        for p in base.glob(pattern):
            try:
                if p.resolve() not in keep and now - p.stat().st_mtime > idle_days * _DAY:
                    p.unlink()
                    removed.append(p)
            except OSError:
                continue
    return removed
