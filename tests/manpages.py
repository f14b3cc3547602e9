"""libvirt's own key tables, read from the man pages it installs: the outside oracle for send-key.

libvirt generates virkeycode-SET(7) (every code of a set with the name of its
key) and virkeyname-SET(7) (every Linux code with its name in a set) from
keycodemapdb with keymap-gen, the same tables `virsh send-key` translates
with; virsh(1) lists the codeset names send-key takes.  This reads the
roff source (lines not starting with a dot), nothing else.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

MAN = Path("/usr/share/man")
NO_NAME = ("unnamed", "None")  # how keymap-gen writes a key without a name in the two page kinds

# virsh codeset -> the virkeycode page it reads (libvirt maps "xt" to the AT set 1 table, "rfb" is qnum's old name)
PAGES = {"linux": "linux", "xt": "atset1", "atset1": "atset1", "atset2": "atset2", "atset3": "atset3", "os_x": "osx",
         "xt_kbd": "xtkbd", "usb": "usb", "win32": "win32", "qnum": "qnum", "rfb": "qnum"}  # fmt: skip
NAMED = {"linux": "linux", "os_x": "osx", "win32": "win32"}  # codesets with names -> their virkeyname page


def available() -> bool:
    return (MAN / "man7" / "virkeycode-linux.7.gz").exists() and (MAN / "man1" / "virsh.1.gz").exists()


def _text(section: str, page: str) -> list[str]:
    with gzip.open(MAN / f"man{section}" / f"{page}.{section}.gz", "rt") as f:
        return [line for line in f.read().splitlines() if not line.startswith(".")]


def codes(page: str) -> list[tuple[int, str]]:
    """virkeycode-PAGE(7): (code, key name) rows; the name is Linux's, or the set's own for osx and win32."""
    lines = _text("7", f"virkeycode-{page}")
    rows = []
    for line, following in zip(lines, lines[1:]):
        code = re.fullmatch(r"(\d+) \(0x([0-9a-f]+)\)", line)
        if code:
            name = re.fullmatch(r"Key name (\S+)", following)
            assert name and int(code[1]) == int(code[2], 16), (line, following)
            rows.append((int(code[1]), name[1]))
    return rows


def names(page: str) -> list[tuple[str, int]]:
    """virkeyname-PAGE(7): (name in the set, Linux code) rows."""
    lines = _text("7", f"virkeyname-{page}")
    rows = []
    for line, following in zip(lines, lines[1:]):
        value = re.fullmatch(r"Key value (\d+) \(0x([0-9a-f]+)\)", following)
        if value:
            rows.append((line, int(value[1])))
    return rows


def linux_codes_named(page: str, name: str) -> set[int]:
    """The Linux codes whose name in `page`'s set is `name` (for a key without a name: those without one)."""
    wanted = NO_NAME if name in NO_NAME else (name,)
    return {code for key, code in names(page) if key in wanted}


def virsh_codesets() -> list[str]:
    """The codesets virsh(1) documents under send-key, in its order."""
    lines = _text("1", "virsh")
    start = next(i for i, line in enumerate(lines) if line.startswith(r"send\-key domain"))
    end = next(i for i, line in enumerate(lines[start:], start) if line.startswith(r"\fBExamples:\fP"))
    return [m[1] for line in lines[start:end] if (m := re.fullmatch(r"\\fB([a-z0-9_]+)\\fP", line))]
