"""Keycode sets for `send-key`, as virsh names them, built from keycodemapdb's table.

Every key is translated to its Linux input code, the one code that every
delivery path starts from (a guest's /dev/input, X11 keycodes = Linux + 8,
QEMU's QKeyCode names).  Nothing here is typed in by hand: the tables come
from sandbox/keymaps/keymaps.csv (keycodemapdb, BSD or GPLv2).
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

TABLE = Path(__file__).with_name("keymaps") / "keymaps.csv"
MAX_KEYS = 16  # as virsh send-key

# codeset -> (number column, name column or None)
CODESETS: dict[str, tuple[str, str | None]] = {
    "linux": ("Linux Keycode", "Linux Name"),
    "xt": ("AT set1 keycode", None),
    "atset1": ("AT set1 keycode", None),
    "atset2": ("AT set2 keycode", None),
    "atset3": ("AT set3 keycode", None),
    "xt_kbd": ("Xfree86 KBD XT", None),
    "usb": ("USB Keycodes", None),
    "win32": ("Win32 Keycode", "Win32 Name"),
    "osx": ("OS-X Keycode", "OS-X Name"),
    "qnum": ("AT set1 keycode", None),  # QEMU's numbers: set 1 with 0xe0 folded into bit 7
}


def qnum_of_set1(code: int) -> int:
    """QEMU's key number for an AT set 1 code (0xe0XX prefixed codes -> 0x80 | XX)."""
    return 0x80 | (code & 0x7F) if code > 0xFF else code


@dataclass(frozen=True)
class Codeset:
    name: str
    to_linux: dict[int, int]
    from_linux: dict[int, int]
    names: dict[str, int]  # symbolic name -> code in this set


def _int(text: str) -> int:
    return int(text, 0)


@functools.cache
def codeset(name: str, table: Path = TABLE) -> Codeset:
    """The translation tables of one set (the first row of the CSV wins where rows repeat a code)."""
    if name not in CODESETS:
        raise UsageError(f"unknown codeset {name!r} (one of {', '.join(CODESETS)})")
    number_col, name_col = CODESETS[name]
    to_linux: dict[int, int] = {}
    from_linux: dict[int, int] = {}
    names: dict[str, int] = {}
    with table.open(newline="") as f:
        for row in csv.DictReader(f):
            if not row[number_col] or not row["Linux Keycode"]:
                continue
            code = _int(row[number_col])
            if name == "qnum":
                code = qnum_of_set1(code)
            linux = _int(row["Linux Keycode"])
            to_linux.setdefault(code, linux)
            from_linux.setdefault(linux, code)
            if name_col and row[name_col]:
                names.setdefault(row[name_col], code)
    return Codeset(name, to_linux, from_linux, names)


def parse_key(set_name: str, text: str) -> int:
    """One key as given by the user (a number, decimal or 0x, or a name) -> its Linux code."""
    cs = codeset(set_name)
    code: int | None
    try:
        code = int(text, 0)
    except ValueError:
        code = cs.names.get(text)
        if code is None and set_name == "osx":
            code = cs.names.get(text.removeprefix("kVK_"))
        if code is None:
            what = "names" if CODESETS[set_name][1] else "no names, only numbers"
            raise UsageError(f"unknown key {text!r} in codeset {set_name} (it has {what})") from None
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


def to_set(set_name: str, linux: int) -> int:
    """A Linux code in another set; an error where that set cannot express the key."""
    code = codeset(set_name).from_linux.get(linux)
    if code is None:
        raise UsageError(f"Linux key {linux} has no code in codeset {set_name}")
    return code
