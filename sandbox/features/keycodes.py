"""Keycode sets for `send-key`, as virsh names and reads them, built from keycodemapdb's table.

Every key is translated to its Linux input code, the one code that every
delivery path starts from (a guest's /dev/input, X11 keycodes = Linux + 8,
QEMU's QKeyCode names).  The tables come from sandbox/features/keymaps/keymaps.csv
(keycodemapdb, BSD or GPLv2), read the way keycodemapdb's own generator
(keymap-gen) reads it, which is how libvirt builds the tables `virsh
send-key` uses and its virkeycode-SET(7) man pages; the tests hold every
row of those man pages against this module.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sandbox.core.errors import UsageError

TABLE = Path(__file__).with_name("keymaps") / "keymaps.csv"
MAX_KEYS = 16  # as virsh send-key

# libvirt's names for the sets (virKeycodeSet), in virsh(1)'s order.
CODESETS = ("linux", "xt", "atset1", "atset2", "atset3", "os_x", "xt_kbd", "win32", "usb", "qnum")
# Older names: virsh still takes "rfb" for qnum; this tool took "osx" before it took os_x.
ALIASES = {"rfb": "qnum", "osx": "os_x"}

_CODE_COLUMNS = {"linux": "Linux Keycode", "atset1": "AT set1 keycode", "atset2": "AT set2 keycode",
                 "atset3": "AT set3 keycode", "os_x": "OS-X Keycode", "win32": "Win32 Keycode", "usb": "USB Keycodes"}  # fmt: skip
_NAME_COLUMNS = {"linux": "Linux Name", "os_x": "OS-X Name", "win32": "Win32 Name"}
QCODE_COLUMN = "QEMU QKeyCode"

# Hanja and Hangeul send set 1 codes with bit 7 set and no 0xe0 prefix
# (make codes without break codes): xt_kbd keeps them as they are, and
# qnum, QEMU's numbering, keeps the 0x71/0x72 it has always used.
HANJA_HANGEUL = (0xF1, 0xF2)

# libvirt 9.0 (Debian 12) builds its tables and man pages from keycodemapdb
# da30b01 (2021); the table shipped here is 22b8996 (2023), after two fixes
# that moved three keys.  Where the old code is free in the new table it
# means what that libvirt means (Hanja and Hangeul as set 1 0x71/0x72, as
# well as the corrected 0xf1/0xf2); macOS's ISO_Section (0x0a) is KEY_ISO
# there and KEY_102ND here, and virsh's meaning wins: this is `virsh
# send-key`'s interface.
_KEY_ISO, _KEY_HANGEUL, _KEY_HANJA = 170, 122, 123
LIBVIRT_9_CODES: dict[str, dict[int, int]] = {
    "atset1": {0x71: _KEY_HANJA, 0x72: _KEY_HANGEUL},
    "xt_kbd": {0x71: _KEY_HANJA, 0x72: _KEY_HANGEUL},
    "os_x": {0x0A: _KEY_ISO},
}
LIBVIRT_9_NAMES: dict[str, dict[str, int]] = {"os_x": {"ISO_Section": _KEY_ISO}}


def xt_kbd_of_set1(code: int) -> int:
    """Linux's raw XT code (xt_kbd) for an AT set 1 code: 0xe0-prefixed codes become 0x100 | low bits."""
    return code if code <= 0x7F or code in HANJA_HANGEUL else 0x100 | (code & 0x7F)


def qnum_of_set1(code: int) -> int:
    """QEMU's key number (qnum) for an AT set 1 code: 0xe0-prefixed codes become 0x80 | low bits."""
    if code in HANJA_HANGEUL:
        return code & 0x7F
    return 0x80 | (code & 0x7F) if code > 0x7F else code


@dataclass(frozen=True)
class Codeset:
    """One set: its codes' Linux keys, and its names' Linux keys."""

    name: str
    to_linux: Mapping[int, int]
    names: Mapping[str, int]


@dataclass(frozen=True)
class Table:
    """The whole CSV, read as keymap-gen reads it: where rows repeat a code or a key, the last row wins."""

    codesets: Mapping[str, Codeset]
    from_linux: Mapping[str, Mapping[int, int]]  # set -> Linux code -> code in the set
    linux_names: Mapping[int, str]
    qcodes: Mapping[int, str]  # Linux code -> QEMU QKeyCode name
    qcode_keys: Mapping[str, int]  # QKeyCode name -> Linux code (as QEMU's generated table)


@functools.cache
def table(path: Path = TABLE) -> Table:
    """The translation tables, built from the CSV at `path`."""
    to_linux: dict[str, dict[int, int]] = {s: {} for s in [*_CODE_COLUMNS, "xt_kbd", "qnum"]}
    from_linux: dict[str, dict[int, int]] = {s: {} for s in to_linux}
    names: dict[str, dict[str, int]] = {s: {} for s in _NAME_COLUMNS}
    linux_names: dict[int, str] = {}
    qcodes: dict[int, str] = {}
    qcode_keys: dict[str, int] = {}

    def add(codeset: str, code: int, linux: int) -> None:
        to_linux[codeset][code] = linux
        from_linux[codeset][linux] = code

    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            linux = int(row["Linux Keycode"], 0)
            for codeset, column in _CODE_COLUMNS.items():
                if row[column]:
                    add(codeset, int(row[column], 0), linux)
            for codeset, column in _NAME_COLUMNS.items():
                # A name means its own row's key, which may differ from its
                # number's (win32 VK_KANA is KEY_KATAKANA, 0x15 KEY_HANGEUL);
                # the first row wins, as in libvirt (the lowest Linux code),
                # and names of rows that are not a key's last (KEY_SHIFT,
                # VK_SHIFT), which libvirt skips, are taken too.
                if row[column]:
                    names[codeset].setdefault(row[column], linux)
            if row["Linux Name"]:
                linux_names[linux] = row["Linux Name"]
            if row[QCODE_COLUMN]:
                qcodes[linux] = row[QCODE_COLUMN]
                qcode_keys[row[QCODE_COLUMN]] = linux
            if row["AT set1 keycode"]:
                set1 = int(row["AT set1 keycode"], 0)
                add("xt_kbd", xt_kbd_of_set1(set1), linux)
                add("qnum", qnum_of_set1(set1), linux)
                if qnum_of_set1(set1) == 0x54:
                    to_linux["qnum"][0xB7] = linux  # QEMU also takes 0xb7 for Print/SysRq (an old mistake kept)
    for codeset, codes in LIBVIRT_9_CODES.items():
        to_linux[codeset].update(codes)
    for codeset, named in LIBVIRT_9_NAMES.items():
        names[codeset].update(named)
    to_linux["xt"] = to_linux["atset1"]  # libvirt: "XT is same as AT Set1 - it was included by mistake"
    codesets = {s: Codeset(s, to_linux[s], names.get(s, {})) for s in CODESETS}
    return Table(codesets, from_linux, linux_names, qcodes, qcode_keys)


def codeset(name: str) -> Codeset:
    """The set virsh calls `name` (or an older name of it)."""
    sets = table().codesets
    cs = sets.get(ALIASES.get(name, name))
    if cs is None:
        raise UsageError(f"unknown codeset {name!r} (one of {', '.join(CODESETS)})")
    return cs


def key_name(linux: int) -> str:
    """A Linux key as messages show it: KEY_F13 (Linux 183)."""
    name = table().linux_names.get(linux)
    return f"{name} (Linux {linux})" if name else f"Linux key {linux}"


def parse_key(set_name: str, text: str) -> int:
    """One key as given by the user (a number, decimal or 0x, or a name) -> its Linux code."""
    cs = codeset(set_name)
    try:
        code = int(text, 0)
    except ValueError:
        named = cs.names.get(text)
        if named is None and cs.name == "os_x":
            named = cs.names.get(text.removeprefix("kVK_"))
        if named is None:
            what = "names" if cs.names else "no names, only numbers"
            raise UsageError(f"unknown key {text!r} in codeset {set_name} (it has {what})") from None
        return named
    linux = cs.to_linux.get(code)
    if linux is None:
        raise UsageError(f"key {text} is not a key of codeset {set_name}")
    return linux


def parse_keys(set_name: str, keys: list[str]) -> list[int]:
    """The keys of one send-key call -> Linux codes (pressed together, released together)."""
    if not keys:
        raise UsageError("no keys given")
    if len(keys) > MAX_KEYS:
        raise UsageError(f"{len(keys)} keys: at most {MAX_KEYS} can be pressed at once")
    return [parse_key(set_name, k) for k in keys]


def code_in(set_name: str, linux: int) -> int | None:
    """A Linux key's code in another set (None where that set has no such key)."""
    return table().from_linux[ALIASES.get(set_name, set_name)].get(linux)
