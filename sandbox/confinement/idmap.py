"""Idmapped mounts and the user namespace that lets an unprivileged QEMU serve a tree as its owner.

Started as root, QEMU runs as `nobody` (q).  For a read-write share owned
by o, QEMU must write there as o without the user's files ever changing
owner.  Two pieces do that, both with the same id map, which swaps o and q
and leaves every other id as it is:

- an idmapped mount of the share (and of the read-only root, so that both
  agree): on it, o's files are q's to QEMU, and what QEMU creates lands
  on disk as o's;
- QEMU joins a user namespace with that map, so that what it stats and
  reports over 9p shows the real owners again (o's files as o's).

QEMU's uid inside is o, which is 0 for a root-owned tree: it then keeps no
capability but CAP_DAC_READ_SEARCH, and SECBIT_NOROOT stops exec from
giving any back.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from ..errors import ConfinementError

_libc = ctypes.CDLL(None, use_errno=True)

SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442  # x86-64
OPEN_TREE_CLONE = 1
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x00100000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
CLONE_NEWUSER = 0x10000000
MAX_ID = 4294967295  # ids 0 .. 2**32-2 are valid; (uid_t)-1 is not


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def swap_map(a: int, b: int) -> str:
    """An id map (uid_map/gid_map text) that swaps `a` and `b` and keeps all else."""
    lo, hi = sorted((a, b))
    if lo == hi:
        return f"0 0 {MAX_ID}\n"
    lines = [(0, 0, lo), (lo, hi, 1), (lo + 1, lo + 1, hi - lo - 1), (hi, lo, 1), (hi + 1, hi + 1, MAX_ID - hi - 1)]
    return "".join(f"{inside} {outside} {count}\n" for inside, outside, count in lines if count > 0)


def make_userns(uid_map: str, gid_map: str) -> int:
    """An fd for a new user namespace with these maps (held by no process)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only unshares and waits
        try:
            os.close(ready_r)
            os.close(go_w)
            ok = _libc.unshare(CLONE_NEWUSER) == 0
            os.write(ready_w, b"1" if ok else b"0")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise ConfinementError("cannot create a user namespace for QEMU (unshare(CLONE_NEWUSER) failed)")
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(uid_map)
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(gid_map)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(go_w)
        os.waitpid(pid, 0)


def idmapped_clone(path: str, userns_fd: int, readonly: bool) -> int:
    """A detached copy of the mount at `path`, idmapped through `userns_fd`.

    Only that mount, not what is mounted below it: the filesystems under
    it (proc, sysfs, ...) mostly cannot be idmapped, and the guest mounts
    its own.
    """
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC
    fd = _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), flags), f"open_tree {path}")
    attr = _MountAttr(MOUNT_ATTR_IDMAP | (MOUNT_ATTR_RDONLY if readonly else 0), 0, 0, userns_fd)
    try:
        _check(
            _libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)),
            f"idmapped mount of {path}",
        )
    except OSError:
        os.close(fd)
        raise
    return fd


def attach(mount_fd: int, target: str) -> None:
    """Mount a detached tree at `target` (in the caller's mount namespace)."""
    _check(
        _libc.syscall(SYS_MOVE_MOUNT, mount_fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH),
        f"move_mount {target}",
    )


def join_userns(fd: int) -> None:
    _check(_libc.setns(fd, CLONE_NEWUSER), "setns(user)")


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int

    @classmethod
    def of(cls, path: str) -> Owner:
        st = os.stat(path)
        return cls(st.st_uid, st.st_gid)
