"""Where this user's pool is found: in the user's own runtime base, beside the runtime dirs.

Light (sandbox/core/runbase.py only): the pooled client looks here first.
"""

from __future__ import annotations

import os

from sandbox.core import runbase


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
