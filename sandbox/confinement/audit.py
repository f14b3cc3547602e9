"""The audit trail: one JSON line per sandbox start and stop."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from sandbox.core import cache


def log_path() -> Path:
    """/var/log/sandbox/audit.jsonl for root, else $XDG_STATE_HOME/sandbox/audit.jsonl."""
    env = os.environ.get("SANDBOX_AUDIT_LOG")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/log/sandbox/audit.jsonl")
    return cache.state_dir() / "audit.jsonl"


ARGV_KEEP = 4096  # characters of a command kept in the log; the rest is summed up


def summarize_argv(argv: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The command for the log: whole when short, else its head, size and hash."""
    total = sum(len(a) + 1 for a in argv)
    if total <= ARGV_KEEP:
        return {"argv": list(argv)}
    head: list[str] = []
    used = 0
    for a in argv:
        if used + len(a) + 1 > ARGV_KEEP:
            if not head:
                head.append(a[:ARGV_KEEP])
            break
        head.append(a)
        used += len(a) + 1
    digest = hashlib.sha256(b"\0".join(a.encode("utf-8", "surrogateescape") for a in argv)).hexdigest()
    return {"argv_head": head, "argc": len(argv), "bytes": total, "sha256": digest}


def record(event: str, **fields: Any) -> None:
    """Append one entry; a concurrent writer never interleaves with it."""
    path = log_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields}
    line = json.dumps(entry, sort_keys=False) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def tail(n: int) -> list[str]:
    """The last `n` entries, as stored."""
    try:
        with log_path().open() as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=max(n, 0))]
    except FileNotFoundError:
        return []
