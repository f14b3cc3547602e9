"""A reproducible cpio "newc" archive writer, as the kernel's initramfs unpacker reads it."""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    path: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    rdev: tuple[int, int] = (0, 0)


@dataclass
class CpioWriter:
    """Collects entries with small verbs, then writes them sorted with mtime 0.

    Sorting by path puts every directory before what it contains, and fixed
    inode numbers, owners and times make the output a function of the input.
    """

    entries: dict[str, Entry] = field(default_factory=dict)

    def _add(self, entry: Entry) -> None:
        path = entry.path.strip("/")
        if not path or path.startswith("..") or "/../" in f"/{path}/":
            raise ValueError(f"bad archive path {entry.path!r}")
        parent = path.rpartition("/")[0]
        if parent and parent not in self.entries:
            self.dir(parent)
        self.entries[path] = Entry(path, entry.mode, entry.data, entry.uid, entry.gid, entry.rdev)

    def dir(self, path: str, mode: int = 0o755) -> None:
        self._add(Entry(path, stat.S_IFDIR | mode))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(Entry(path, stat.S_IFREG | mode, data))

    def symlink(self, path: str, target: str) -> None:
        self._add(Entry(path, stat.S_IFLNK | 0o777, target.encode()))

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(Entry(path, stat.S_IFCHR | mode, rdev=(major, minor)))

    def getvalue(self) -> bytes:
        out = bytearray()
        for ino, path in enumerate(sorted(self.entries), start=1):
            _write_entry(out, ino, self.entries[path])
        _write_entry(out, 0, Entry(_TRAILER, 0))
        return bytes(out)


def _pad4(out: bytearray) -> None:
    out += b"\0" * (-len(out) % 4)


def _write_entry(out: bytearray, ino: int, e: Entry) -> None:
    name = e.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(e.mode) else 1
    fields = (ino, e.mode, e.uid, e.gid, nlink, 0, len(e.data), 0, 0, *e.rdev, len(name), 0)
    out += _MAGIC + b"".join(b"%08X" % v for v in fields)
    out += name
    _pad4(out)
    out += e.data
    _pad4(out)
