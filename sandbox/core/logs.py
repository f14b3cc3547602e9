"""Reading the end of a log (QEMU's, the guest console's) for an error message."""

from __future__ import annotations

import os
from pathlib import Path


def log_tail(path: Path, limit: int = 2000) -> str:
    """The last `limit` bytes of a log file, as text."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
