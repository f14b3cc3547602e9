"""Who libvirt runs QEMU as, for a run on this host (a local URI).

libvirt's qemu driver runs QEMU as its own user (qemu.conf's `user`,
libvirt-qemu on Debian), which cannot read a 0700 home or anything under
it, yet the guest overlays the caller's working directory and home
copy-on-write, and its 9p server is that QEMU.  A per-domain static DAC
label (`<seclabel type='static' model='dac' relabel='no'>`) makes libvirt
run QEMU as the caller instead; the rule, in `qemu_identity`:

- a normal user's QEMU always runs as that user, as the direct backend's
  does: the guest sees exactly the files the user may read, with their
  real owners, and QEMU holds no capability (libvirt clears them for any
  uid but 0);
- root's QEMU runs as root only when libvirt's own user cannot read a
  directory the guest overlays from the host: libvirt 9.0 then starts it
  as uid 0 with libvirtd's whole capability set (qemu.conf's
  clear_emulator_capabilities does not apply to it; measured), so it is
  not done where it is not needed.

Everything here is pure but `host_groups` and the default stat.
"""

from __future__ import annotations

import os
import pwd
import stat
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    """A uid and gid, with the supplementary groups that go with them."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def default_user(caps: ET.Element, virt_type: str) -> tuple[int, int] | None:
    """The uid and gid libvirt's DAC driver gives QEMU by default (its capabilities' baselabel); None without a DAC driver."""
    for model in caps.iterfind("host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        for base in model.iterfind("baselabel"):
            if base.get("type") == virt_type:
                return parse_label(base.text or "")
    return None


def parse_label(text: str) -> tuple[int, int] | None:
    """`+UID:+GID` (libvirt's numeric DAC label) as numbers; None for anything else."""
    user, sep, group = text.strip().partition(":")
    if not sep or not user.startswith("+") or not group.startswith("+") or not (user[1:].isdigit() and group[1:].isdigit()):
        return None
    return int(user[1:]), int(group[1:])


def host_groups(uid: int, gid: int) -> tuple[int, ...]:
    """The groups libvirt gives a process it starts as uid:gid: the group database's list for that user."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return (gid,)
    try:
        return tuple(os.getgrouplist(name, gid))
    except OSError:
        return (gid,)


def can_read(path: str, who: Identity, stat_fn: Callable[[str], os.stat_result] = os.stat) -> bool:
    """Whether `who` may list `path` (r and x) and reach it (x on every parent), by mode bits alone.

    ACLs are not read: a directory open to libvirt's user only through an
    ACL is taken as closed, which costs nothing but running QEMU as the
    caller.
    """
    if who.uid == 0:
        return True
    parts = [p for p in path.split("/") if p]
    dirs = ["/" + "/".join(parts[:i]) for i in range(len(parts) + 1)]
    for i, d in enumerate(dirs):
        try:
            st = stat_fn(d)
        except OSError:
            return False
        need = stat.S_IXOTH | (stat.S_IROTH if i == len(dirs) - 1 else 0)
        if st.st_uid == who.uid:
            bits = (st.st_mode >> 6) & 0o7
        elif st.st_gid == who.gid or st.st_gid in who.groups:
            bits = (st.st_mode >> 3) & 0o7
        else:
            bits = st.st_mode & 0o7
        if bits & need != need:
            return False
    return True


@dataclass(frozen=True)
class Choice:
    """QEMU's uid and gid for one run (None: libvirt's own user), and why, for -v."""

    label: tuple[int, int] | None
    why: str


def qemu_identity(
    caller: tuple[int, int],
    libvirt_user: Identity | None,
    overlays: Iterable[str],
    exists: Callable[[str], bool] = os.path.isdir,
    readable: Callable[[str, Identity], bool] = can_read,
) -> Choice:
    """Whether QEMU runs as the caller (see the module's docstring for the rule).

    `overlays` are the host directories the guest shows copy-on-write
    (mounts.Plan's MOP_OVERLAY steps); one the host lacks is skipped, as
    the guest skips it.
    """
    uid, gid = caller
    if libvirt_user is None:
        return Choice(None, "libvirt has no DAC driver: QEMU runs as libvirtd sets it up")
    if (libvirt_user.uid, libvirt_user.gid) == caller:
        return Choice(None, "libvirt's QEMU user is the caller")
    if uid != 0:
        return Choice(caller, "a normal user's QEMU runs as that user")
    closed = [d for d in overlays if exists(d) and not readable(d, libvirt_user)]
    if not closed:
        return Choice(None, f"libvirt's QEMU user (uid {libvirt_user.uid}) can read every overlaid directory")
    return Choice(caller, f"libvirt's QEMU user (uid {libvirt_user.uid}) cannot read {', '.join(closed)}")
