"""Idmapped mounts and the user namespace that lets an unprivileged QEMU serve read-write shares as root would.

Started as root with a read-write share, QEMU must act on the share as
root acts on the host (keep setuid bits on a write, chown and chgrp, write
another user's file) without ever being root on the host.  Two pieces do
that, both with the same id map, which shifts ids 0..65535 to a range of
host ids that no file or process uses (2**31 and up, one slot of 65536 per
live sandbox, reserved host-wide):

- QEMU runs as uid 0 of a user namespace with that map.  Its capabilities
  there (chown, DAC override and read-search, fowner, fsetid; nothing
  else) count only for inodes whose owner and group map into it;
- an idmapped mount of each share (and of the read-only root, so that both
  agree) shifts the files' real owners into the range: on it, a file of
  uid k is QEMU's namespace's uid k, so it shows its real owner over 9p
  and QEMU's capabilities apply to it, and what QEMU creates or chowns as
  uid k lands on disk as k.

Every other file on the host is owned by an id outside the namespace's
range: for QEMU it belongs to `nobody`, and its capabilities mean nothing
there.  Files owned by ids above 65535 are outside the range on the
idmapped mounts too (they show as `nobody`'s, as on an NFS export with
root squashing).
"""

from __future__ import annotations

import ctypes
import os

from sandbox.core.errors import ConfinementError

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


# Host ids for QEMU's user namespaces: above every id in ordinary use
# (systemd's container and foreign ranges end below 2**31).
ID_BASE = 1 << 31
ID_COUNT = 1 << 16
ID_SLOTS = (1 << 15) - 1


def shifted_map(base: int, count: int = ID_COUNT) -> str:
    """An id map (uid_map/gid_map text): ids 0..count-1 inside are base.. outside."""
    return f"0 {base} {count}\n"


def slot_base(slot: int) -> int:
    if not 0 <= slot < ID_SLOTS:
        raise ValueError(f"bad id slot {slot}")
    return ID_BASE + slot * ID_COUNT


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
