"""What the guest sees where: the mount plan over the host's read-only root (pure).

By default the guest sees the host's files as they are, copy-on-write:
`/home`, the user's home (wherever it is), `/tmp` and the working directory
are overlays whose lower layer is the host's directory (read-only over 9p)
and whose upper layer is a private tmpfs, so the command can change them
and every change vanishes with the VM.  `/run` and `/var/tmp` start empty.
Secrets in the home are hidden behind empty private files and directories.
`--share` adds host directories (read-only, read-write or copy-on-write),
`--tmpfs` empty ones, and `--private` turns an overlay into an empty tmpfs.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sandbox.core.errors import UsageError
from sandbox.wire.protocol import MOP_HIDE_DIR, MOP_HIDE_FILE, MOP_HOME, MOP_MKDIR, MOP_OVERLAY, MOP_SHARE_COW, MOP_SHARE_RO, MOP_SHARE_RW, MOP_TMPFS, MountStep

# Relative to the home.  Each is replaced by an empty private directory or
# file in the guest, whatever the home's source; --unhide lifts one.
DEFAULT_HIDDEN = (
    ".ssh",
    ".gnupg",
    ".aws",
    ".azure",
    ".config/gcloud",
    ".kube",
    ".docker/config.json",
    ".netrc",
    ".git-credentials",
    ".password-store",
    ".config/gh",
    ".local/share/keyrings",
    ".mozilla",
    ".config/google-chrome",
    ".config/chromium",
    ".config/BraveSoftware",
    ".config/microsoft-edge",
    ".thunderbird",
)

COW_BY_DEFAULT = ("/home", "/tmp")
EMPTY_BY_DEFAULT = ("/run", "/var/tmp")
SHARE_MODES = ("ro", "rw", "cow")
_SHARE_OP = {"ro": MOP_SHARE_RO, "rw": MOP_SHARE_RW, "cow": MOP_SHARE_COW}


@dataclass(frozen=True)
class Share:
    """A host directory shown at a guest path: ro, rw (writes persist) or cow."""

    host: Path
    guest: str
    mode: str = "cow"

    @property
    def writable(self) -> bool:
        return self.mode == "rw"


@dataclass(frozen=True)
class Plan:
    """The guest's mount steps, and the shares (by 9p tag) QEMU must export."""

    steps: tuple[MountStep, ...]
    shares: tuple[tuple[str, Share], ...]
    homes: tuple[str, ...] = ()  # the host's other homes, whose secrets the steps hide (no image may cover one)


def split_escaped(text: str, sep: str = ":") -> list[str]:
    """Split on `sep` unless escaped with a backslash (`\\:`, `\\\\`)."""
    fields, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i + 1])
            i += 2
            continue
        if c == sep:
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    fields.append("".join(cur))
    return fields


def _guest_path(text: str, what: str) -> str:
    if not text.startswith("/"):
        raise UsageError(f"{what}: the guest path {text!r} is not absolute")
    path = os.path.normpath(text)
    path = "/" + path.lstrip("/")  # normpath keeps a leading '//'
    if path == "/":
        raise UsageError(f"{what}: cannot mount over the guest's root")
    return path


def working_directory() -> str:
    """The launcher's cwd, which the guest shows at the same path."""
    try:
        return os.getcwd()
    except OSError as exc:
        raise UsageError(f"the working directory cannot be shown in the sandbox: {exc.strerror}") from None


def parse_share(text: str, cwd: str) -> Share:
    """HOST[:GUEST][:ro|rw|cow] (`\\:` for a colon in a path); HOST relative to `cwd`."""
    what = f"--share {text}"
    fields = split_escaped(text)
    mode = "cow"
    if len(fields) > 1 and fields[-1] in SHARE_MODES:
        mode = fields.pop()
    if len(fields) > 2 or not fields[0]:
        raise UsageError(f"{what}: expected HOST[:GUEST][:ro|rw|cow] (write \\: for a ':' in a path)")
    host = Path(os.path.realpath(os.path.join(cwd, os.path.expanduser(fields[0]))))
    if not host.is_dir():
        raise UsageError(f"{what}: {host} is not a directory")
    guest = _guest_path(fields[1], what) if len(fields) == 2 else str(host)
    if guest == "/":
        raise UsageError(f"{what}: cannot share the root; it is always visible read-only")
    return Share(host, guest, mode)


_SIZE = re.compile(r"\d+[kKmMgG%]?")


def parse_tmpfs(text: str) -> tuple[str, str]:
    """PATH[:SIZE] -> (guest path, tmpfs size option or "")."""
    fields = split_escaped(text)
    size = ""
    if len(fields) > 1 and _SIZE.fullmatch(fields[-1]):
        size = fields.pop()
    if len(fields) != 1:
        raise UsageError(f"--tmpfs {text}: expected PATH[:SIZE], e.g. /scratch:256M")
    return _guest_path(fields[0], f"--tmpfs {text}"), size


def under(path: str, top: str) -> bool:
    """Whether `path` is `top` or inside it (both normalised absolute paths)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def _depth(path: str) -> int:
    return path.rstrip("/").count("/")


def host_kind(path: str) -> str | None:
    """'dir', 'file' or None for a host path (never following a final symlink)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return "dir" if stat.S_ISDIR(st.st_mode) else "file"


def covering_in(guest: str, steps: Sequence[MountStep]) -> MountStep | None:
    """The deepest of `steps` whose mount holds `guest` (None: the read-only root)."""
    found: MountStep | None = None
    for m in steps:
        if m.op in (MOP_HOME, MOP_MKDIR):
            continue  # not mounts
        if under(guest, m.path) and (found is None or _depth(m.path) >= _depth(found.path)):
            found = m
    return found


def plan(
    home: str,
    cwd: str,
    shares: Sequence[Share] = (),
    tmpfs: Sequence[tuple[str, str]] = (),
    private: Sequence[str] = (),
    hide: Sequence[str] = (),
    unhide: Sequence[str] = (),
    kind: Callable[[str], str | None] = host_kind,
    resolve: Callable[[str], str] = os.path.realpath,
    homes: Sequence[str] = (),
    local: bool = True,
) -> Plan:
    """The mount steps for a guest whose user has `home` and starts in `cwd` (real paths).

    `homes` are every other home directory on the host (real paths, see
    `host_homes`): their secrets are hidden too, wherever the guest sees
    them, on the root or in a share.  `local` False: the root is another
    host's (a remote libvirt host), whose files the launcher cannot see, so
    nothing is looked up (`kind`, `resolve`): a mount point that may be
    missing is made first, a hidden path is hidden as whichever of a
    directory or a file it turns out to be there, and a working directory
    in an empty tmpfs stays empty.
    """
    has_home = home.startswith("/") and home != "/"
    private_set = {_guest_path(p, f"--private {p}") for p in private}
    base: list[MountStep] = []
    for path in COW_BY_DEFAULT + ((home,) if has_home else ()):
        if path in private_set or any(under(path, b.path) for b in base if b.op == MOP_OVERLAY):
            continue
        base.append(MountStep(MOP_OVERLAY, path))
    for path in EMPTY_BY_DEFAULT:
        base.append(MountStep(MOP_TMPFS, path, mode=0o1777 if path == "/var/tmp" else 0o755))
    for path in sorted(private_set):
        if path in ("/tmp", "/var/tmp"):
            base.append(MountStep(MOP_TMPFS, path, mode=0o1777))
        elif has_home and under(path, home):
            base.append(MountStep(MOP_TMPFS, path, tag="u", mode=0o700))
        elif path not in EMPTY_BY_DEFAULT:
            base.append(MountStep(MOP_TMPFS, path, mode=0o755))

    user: list[MountStep] = []
    exported: list[tuple[str, Share]] = []
    for i, share in enumerate(shares):
        tag = f"share{i}"
        exported.append((tag, share))
        user.append(MountStep(_SHARE_OP[share.mode], share.guest, tag=tag))
    for path, size in tmpfs:
        user.append(MountStep(MOP_TMPFS, path, mode=0o1777, size=size))
    # A user's step at a default's own path replaces it.
    base = [b for b in base if all(u.path != b.path for u in user)]

    steps = sorted(base, key=lambda m: _depth(m.path))

    def covering(guest: str) -> MountStep | None:
        return covering_in(guest, steps + user)

    def source_of(guest: str) -> str | None:
        """The host path shown at `guest`, or None where the guest's view is empty or its own."""
        found = covering(guest)
        if found is None or found.op == MOP_OVERLAY:
            return guest
        if found.op in (MOP_SHARE_RO, MOP_SHARE_RW, MOP_SHARE_COW):
            share = dict(exported)[found.tag]
            rel = os.path.relpath(guest, found.path)
            return os.path.normpath(os.path.join(str(share.host), rel))
        return None

    def views_of(host: str) -> list[str]:
        """Every guest path that shows host path `host`: the root's own, and each share's."""
        found = [host] if source_of(host) == host else []
        for _, share in exported:
            top = str(share.host)
            if under(host, top):
                guest = os.path.normpath(os.path.join(share.guest, os.path.relpath(host, top)))
                if source_of(guest) == host and guest not in found:
                    found.append(guest)
        return found

    own = home if has_home else None
    lifted = _unhidden_paths(own, unhide)
    candidates = _hidden_paths(own, hide)
    for other in sorted(set(homes)):
        if other.startswith("/") and other != "/":
            for rel in DEFAULT_HIDDEN:
                for guest in views_of(os.path.join(other, rel)):
                    if guest not in candidates:
                        candidates.append(guest)
    for path in sorted(lifted):
        if path not in candidates:
            raise UsageError(f"--unhide {path}: not a hidden path (hidden by default: {', '.join(DEFAULT_HIDDEN)}, in any home)")
    hidden = [p for p in candidates if p not in lifted]
    for path in hidden:
        if under(cwd, path):
            raise UsageError(f"the working directory {cwd} is hidden in the sandbox (--unhide {path} shows it)")
    # The working directory is visible, copy-on-write, wherever it is.
    cover = covering(cwd)
    if cwd != "/" and (cover is None or (local and cover.op == MOP_TMPFS)):
        steps.append(MountStep(MOP_OVERLAY, cwd))
    user.sort(key=lambda m: _depth(m.path))
    # A user's mount point that the read-only root lacks is made first (the
    # init gives the root a copy-on-write layer for that, then seals it).
    mkdirs = []
    for i, m in enumerate(user):
        if covering_in(m.path, steps + user[:i]) is None and (not local or kind(m.path) != "dir"):
            if local and kind(m.path) is not None:
                raise UsageError(f"{m.path} exists in the guest's root and is not a directory: cannot mount over it")
            mkdirs.append(MountStep(MOP_MKDIR, m.path))
    if not local:
        # Another host's root may lack a private tmpfs's mount point too (a home of ours it does not have).
        for i, m in enumerate(steps):
            if m.op == MOP_TMPFS and m.path not in EMPTY_BY_DEFAULT and covering_in(m.path, steps[:i]) is None:
                mkdirs.append(MountStep(MOP_MKDIR, m.path))
    steps = mkdirs + steps + user
    if has_home:
        steps.append(MountStep(MOP_HOME, home))
    for path in hidden:
        src = source_of(path)
        if not local:
            if src is not None and all(m.path != path for m in steps):
                steps += [MountStep(MOP_HIDE_DIR, path), MountStep(MOP_HIDE_FILE, path)]  # the init applies the one that fits
            continue
        if src is not None and src == path:
            # A secret that is a symlink (~/.netrc -> dotfiles/netrc) is
            # hidden where it points: the guest never mounts through a link.
            path = src = resolve(path)
        k = kind(src) if src is not None else None
        if k is not None and all(m.path != path for m in steps):
            steps.append(MountStep(MOP_HIDE_DIR if k == "dir" else MOP_HIDE_FILE, path))
    return Plan(tuple(steps), tuple(exported), tuple(homes))


def _absolute(p: str, home: str | None, what: str) -> str | None:
    """A hidden path as the user writes it (relative: in the home) as a guest path; None without a home."""
    if p.startswith("~/") or p == "~":
        p = p[2:] if len(p) > 1 else ""
    elif p.startswith("/"):
        return _guest_path(p, what)
    if home is None:
        return None
    return os.path.normpath(os.path.join(home, p))


def _hidden_paths(home: str | None, hide: Sequence[str]) -> list[str]:
    """The user's own home's secrets and every --hide, as guest paths."""
    wanted = [_absolute(p, home, "hidden path") for p in DEFAULT_HIDDEN]
    wanted += [_absolute(p, home, f"--hide {p}") for p in hide]
    out: list[str] = []
    for p in wanted:
        if p is not None and p not in out:
            out.append(p)
    return out


def _unhidden_paths(home: str | None, unhide: Sequence[str]) -> set[str]:
    out = set()
    for p in unhide:
        path = _absolute(p, home, f"--unhide {p}")
        if path is None:
            raise UsageError(f"--unhide {p}: a path relative to the home, and this run has no home (give an absolute path)")
        out.add(path)
    return out


def host_homes() -> list[str]:
    """Every home directory of the passwd database, and /root, as real paths (those that exist)."""
    import pwd

    found = {"/root"}
    try:
        found.update(pw.pw_dir for pw in pwd.getpwall())
    except OSError:
        pass
    homes = []
    for path in sorted(found):
        if path.startswith("/") and os.path.normpath(path) != "/" and os.path.isdir(path):
            real = os.path.realpath(path)
            if real != "/" and real not in homes:
                homes.append(real)
    return homes
