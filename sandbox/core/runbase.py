"""Where this user's runtime dirs (and pool) live, and whether that place is safe.

Light on purpose: a run handed to the pool (sandbox/cli/launch.py)
finds the pool's socket here before it imports anything else; paths are
strings, as pathlib alone would add 6 ms to that start.
"""

from __future__ import annotations

import os
import stat


def candidate() -> str:
    """$XDG_RUNTIME_DIR/sandbox, /run/sandbox for root, else /tmp/sandbox-UID (not yet checked: private_dir)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "sandbox")
    if os.geteuid() == 0:
        return "/run/sandbox"
    import tempfile  # only here: it costs the pooled client a few ms

    return os.path.join(tempfile.gettempdir(), f"sandbox-{os.getuid()}")


def private_dir(path: str | os.PathLike[str]) -> bool:
    """Make `path` a 0700 directory of ours, or say it cannot be trusted.

    True if `path` is (now) a real directory, not a symlink, owned by this
    user and closed to everyone else.  Anything else (another user's
    directory, a world-writable one, a symlink planted in /tmp) is left
    untouched and False returned: the launcher must not put its logs and
    sockets where someone else can read, replace or redirect them.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077 == 0
