"""Where this user's pool is found: in the user's own runtime base, beside the runtime dirs.

Light (sandbox/core/runbase.py only): the pooled client looks here first.
"""

from __future__ import annotations

import os

from sandbox.core import runbase


def install_id() -> str:
    """This installation of sandbox: its package directory, and that directory's last change (an upgrade replaces files in it).

    A pool runs its own installation's code (its launchers are imported
    already), so it serves only runs of that installation: another one
    beside it (a second checkout, a venv of another version) restores its
    runs itself.
    """
    pkg = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        changed = os.stat(pkg).st_mtime_ns
    except OSError:
        changed = 0
    return f"{pkg}@{changed}"


def base() -> str | None:
    """The user's runtime base, when it is a private directory of theirs (None: no pool can live anywhere safe)."""
    path = runbase.candidate()
    return path if runbase.private_dir(path) else None


def usable() -> bool:
    return base() is not None


def _in_base(name: str) -> str:
    found = base()
    if found is None:
        raise FileNotFoundError(f"{runbase.candidate()} is not a private directory of yours")
    return os.path.join(found, name)


def socket_path() -> str:
    return _in_base("pool.sock")


def lock_path() -> str:
    return _in_base("pool.lock")


def log_path() -> str:
    return _in_base("pool.log")
