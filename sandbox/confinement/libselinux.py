"""libselinux through ctypes.

The `selinux` module on PyPI is only a shim that imports the distribution's
binding from the system site-packages; in a virtualenv on Debian it finds
nothing.  libselinux.so.1 itself is on every Debian system (coreutils needs
it), so calling it directly works everywhere, inside a venv or not, and
needs no compiled extension.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sandbox.core.errors import ConfinementError

_lib: ctypes.CDLL | None = None


def _libselinux() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("selinux") or "libselinux.so.1"
        try:
            _lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise ConfinementError("libselinux is not installed (apt-get install libselinux1)") from exc
        _lib.freecon.argtypes = [ctypes.c_void_p]
        for fn in ("getfilecon", "lgetfilecon", "getcon"):
            getattr(_lib, fn).restype = ctypes.c_int
    return _lib


def enabled() -> bool:
    """Whether SELinux is enabled on this kernel (and libselinux is present)."""
    if not os.path.isdir("/sys/fs/selinux"):
        return False
    try:
        return bool(_libselinux().is_selinux_enabled() == 1)
    except ConfinementError:
        return False


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise ConfinementError(f"{what}: {os.strerror(err)}")


def _get(fn: str, *args: bytes) -> str:
    lib = _libselinux()
    con = ctypes.c_void_p()
    _check(getattr(lib, fn)(*args, ctypes.byref(con)), fn)
    try:
        return ctypes.string_at(con.value).decode() if con.value else ""
    finally:
        lib.freecon(con)


def current() -> str:
    """This process's context."""
    return _get("getcon")


def file_label(path: Path) -> str:
    return _get("lgetfilecon", os.fsencode(path))


def set_file_label(path: Path, context: str) -> None:
    _check(_libselinux().lsetfilecon(os.fsencode(path), context.encode()), f"label {path}")


def set_exec_label(context: str | None) -> None:
    """The context the next execve() runs in (None: the policy's default)."""
    arg = context.encode() if context else None
    _check(_libselinux().setexeccon(arg), f"setexeccon {context}")


def check_context(context: str) -> bool:
    """Whether the loaded policy knows this context."""
    return bool(_libselinux().security_check_context(context.encode()) == 0)


def _walk(path: Path) -> Iterator[Path]:
    yield path
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                yield Path(root) / name


@contextmanager
def relabelled(path: Path, context: str) -> Iterator[None]:
    """Label `path` (recursively) with `context`, restoring every old label afterwards.

    Files that appear meanwhile get the label `path` itself had, so nothing
    keeps the sandbox's categories once it is gone.
    """
    old = {p: file_label(p) for p in _walk(path)}
    try:
        for p in old:
            set_file_label(p, context)
        yield
    finally:
        top = old.get(path, "")
        for p in _walk(path):
            try:
                set_file_label(p, old.get(p, top))
            except ConfinementError:
                pass
