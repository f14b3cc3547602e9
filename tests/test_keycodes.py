"""send-key's keycode sets, from keycodemapdb's table (pure: no VM)."""

from __future__ import annotations

import csv

import pytest

from sandbox import keycodes
from sandbox.errors import UsageError


def rows() -> list[dict[str, str]]:
    with keycodes.TABLE.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", list(keycodes.CODESETS))
def test_every_row_translates_both_ways_in_every_set(name: str) -> None:
    # Several rows may share a code (VK_CONTROL and VK_LCONTROL are both
    # left Ctrl): a translation is right when some row pairs the two.
    cs = keycodes.codeset(name)
    column = keycodes.CODESETS[name][0]
    pairs: set[tuple[int, int]] = set()
    for row in rows():
        if row[column] and row["Linux Keycode"]:
            code = int(row[column], 0)
            pairs.add((keycodes.qnum_of_set1(code) if name == "qnum" else code, int(row["Linux Keycode"], 0)))
    assert len(pairs) > 100
    for code, linux in pairs:
        assert (code, cs.to_linux[code]) in pairs, (code, linux)
        assert (cs.from_linux[linux], linux) in pairs, (code, linux)
        assert cs.to_linux[cs.from_linux[linux]] in {lx for c, lx in pairs if c == cs.from_linux[linux]}


def test_names_and_numbers() -> None:
    assert keycodes.parse_keys("linux", ["KEY_RIGHTCTRL", "KEY_C"]) == [97, 46]
    assert keycodes.parse_keys("linux", ["29", "0x2e"]) == [29, 46]
    assert keycodes.parse_key("win32", "VK_RETURN") == 28
    assert keycodes.parse_key("osx", "kVK_ANSI_A") == keycodes.parse_key("osx", "ANSI_A") == 30
    assert keycodes.parse_key("xt", "0x1c") == 28 and keycodes.parse_key("usb", "40") == 28
    assert keycodes.parse_key("atset1", "0xe01c") == 96  # keypad enter, extended
    assert keycodes.parse_key("qnum", "0x9c") == 96
    assert keycodes.to_set("usb", 28) == 40 and keycodes.to_set("atset2", 28) == 0x5A


@pytest.mark.parametrize(
    "args, message",
    [
        (("linux", ["KEY_NOPE"]), "unknown key 'KEY_NOPE' in codeset linux"),
        (("usb", ["VK_RETURN"]), "unknown key 'VK_RETURN' in codeset usb (it has no names, only numbers)"),
        (("usb", ["0xfff"]), "key 0xfff is not a key of codeset usb"),
        (("linux", ["KEY_A"] * 17), "17 keys: at most 16"),
        (("klingon", ["1"]), "unknown codeset 'klingon'"),
        (("linux", []), "no keys given"),
    ],
)
def test_bad_keys_are_one_line_errors(args: tuple[str, list[str]], message: str) -> None:
    with pytest.raises(UsageError) as err:
        keycodes.parse_keys(*args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_key_a_set_cannot_express() -> None:
    linux_only = next(int(r["Linux Keycode"]) for r in rows() if r["Linux Keycode"] and not r["USB Keycodes"]
                      and int(r["Linux Keycode"]) not in keycodes.codeset("usb").from_linux)  # fmt: skip
    with pytest.raises(UsageError, match="has no code in codeset usb"):
        keycodes.to_set("usb", linux_only)
