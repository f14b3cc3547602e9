"""Per-sandbox runtime directories: private (0700), removed on exit, reclaimed after a crash."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sandbox.core.process import start_ticks
from sandbox.core.runbase import private_dir
from sandbox.core import runbase

log = logging.getLogger(__name__)

_fallback: Path | None = None  # this process's own base when the usual one is unsafe


def runtime_base() -> Path:
    """Where runtime dirs live: $XDG_RUNTIME_DIR/sandbox, /run/sandbox for root, else /tmp/sandbox-UID.

    When that place is not safe to use, a fresh private directory for this
    process alone, with one warning.
    """
    global _fallback
    if _fallback is not None:
        return _fallback
    base = Path(runbase.candidate())
    if not base.parent.exists():
        base.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if private_dir(base):
        return base
    _fallback = Path(tempfile.mkdtemp(prefix=f"sandbox-{os.getuid()}-"))
    log.warning("%s is not a private directory of yours; using %s for this run", base, _fallback)
    return _fallback


def is_fallback() -> bool:
    """Whether runtime_base() gave this process a base of its own (nothing there is shared with other processes)."""
    return _fallback is not None


def reclaim_stale(base: Path) -> None:
    """Remove runtime dirs whose launcher (named in the dir) is gone."""
    for entry in base.iterdir():
        pid_text = entry.name.split("-", 2)[1] if entry.name.count("-") >= 2 else ""
        if entry.name.startswith("run-") and pid_text.isdigit() and start_ticks(int(pid_text)) is None:
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
        if base == _fallback:
            shutil.rmtree(base, ignore_errors=True)
