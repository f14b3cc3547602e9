"""What one process must share with another to act for it on this host: namespaces and root (light: the pooled client's)."""

from __future__ import annotations

import os

NAMESPACES = ("mnt", "user", "net", "pid", "ipc", "uts", "cgroup")


def identity() -> dict[str, object]:
    """This process's namespaces (inode numbers) and root directory (device, inode), as JSON-able data."""
    ns: dict[str, int | None] = {}
    for name in NAMESPACES:
        try:
            ns[name] = os.stat(f"/proc/self/ns/{name}").st_ino
        except OSError:
            ns[name] = None
    root = os.stat("/")
    return {"ns": ns, "root": [root.st_dev, root.st_ino]}
