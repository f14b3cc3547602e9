"""Per-sandbox runtime directories: private (0700), removed on exit, reclaimed after a crash."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def runtime_base() -> Path:
    """Where runtime dirs live: $XDG_RUNTIME_DIR/sandbox, /run/sandbox for root, else /tmp."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        base = Path(xdg) / "sandbox"
    elif os.geteuid() == 0:
        base = Path("/run/sandbox")
    else:
        base = Path(tempfile.gettempdir()) / f"sandbox-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return base


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reclaim_stale(base: Path) -> None:
    """Remove runtime dirs whose launcher (named in the dir) is gone."""
    for entry in base.iterdir():
        pid_text = entry.name.split("-", 2)[1] if entry.name.count("-") >= 2 else ""
        if entry.name.startswith("run-") and pid_text.isdigit() and not _pid_alive(int(pid_text)):
            log.info("removing stale runtime dir %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def runtime_dir() -> Iterator[Path]:
    """A fresh 0700 directory for one sandbox, removed when the block ends."""
    base = runtime_base()
    reclaim_stale(base)
    path = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
