"""send-key's keycode sets, from keycodemapdb's table (pure: no VM)."""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Callable

import manpages
import pytest

from sandbox.features import keycodes
from sandbox.core.errors import UsageError


def rows() -> list[dict[str, str]]:
    with keycodes.TABLE.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", keycodes.CODESETS)
def test_every_row_of_the_table_is_a_key_in_its_sets(name: str) -> None:
    # Rows may share a code (VK_CONTROL and VK_LCONTROL are both left Ctrl,
    # several keys are VK_OEM_102): a code's key is one some row pairs it
    # with, unless libvirt 9's older table gives it another.
    column = {"xt": "AT set1 keycode", "xt_kbd": "AT set1 keycode", "qnum": "AT set1 keycode", "atset1": "AT set1 keycode",
              "atset2": "AT set2 keycode", "atset3": "AT set3 keycode", "os_x": "OS-X Keycode", "win32": "Win32 Keycode",
              "usb": "USB Keycodes", "linux": "Linux Keycode"}[name]  # fmt: skip
    derive: Callable[[int], int] = {"xt_kbd": keycodes.xt_kbd_of_set1, "qnum": keycodes.qnum_of_set1}.get(name, int)
    pairs = {(derive(int(r[column], 0)), int(r["Linux Keycode"], 0)) for r in rows() if r[column]}
    assert len(pairs) > 100
    legacy = keycodes.LIBVIRT_9_CODES.get("atset1" if name == "xt" else name, {})
    cs = keycodes.codeset(name)
    for code, linux in pairs:
        assert (code, cs.to_linux[code]) in pairs or legacy.get(code) == cs.to_linux[code], (hex(code), linux)


def test_names_and_numbers() -> None:
    assert keycodes.parse_keys("linux", ["KEY_RIGHTCTRL", "KEY_C"]) == [97, 46]
    assert keycodes.parse_keys("linux", ["29", "0x2e"]) == [29, 46]
    assert keycodes.parse_key("linux", "KEY_SHIFT") == keycodes.parse_key("win32", "VK_SHIFT") == 42  # names libvirt skips
    assert keycodes.parse_key("win32", "VK_RETURN") == 28
    assert keycodes.parse_key("win32", "VK_KANA") == 90 and keycodes.parse_key("win32", "0x15") == 122  # a name is its own row's key
    assert keycodes.parse_key("os_x", "kVK_ANSI_A") == keycodes.parse_key("osx", "ANSI_A") == 30
    assert keycodes.parse_key("xt", "0x1c") == 28 and keycodes.parse_key("usb", "40") == 28
    assert keycodes.parse_key("atset1", "0xe01c") == 96  # keypad enter, extended
    assert keycodes.parse_key("xt_kbd", "0x11c") == 96 and keycodes.parse_key("xt_kbd", "0x138") == 100  # KP Enter, Right Alt
    assert keycodes.parse_key("xt_kbd", "0x59") == 117  # KEY_KPEQUAL
    assert keycodes.parse_key("qnum", "0x9c") == keycodes.parse_key("rfb", "0x9c") == 96
    # Hanja and Hangeul: set 1 0xf1/0xf2 (and 0x71/0x72 as libvirt 9 has them); qnum 0x71/0x72.
    assert [keycodes.parse_key("atset1", c) for c in ("0xf1", "0xf2", "0x71", "0x72")] == [123, 122, 123, 122]
    assert [keycodes.parse_key("qnum", c) for c in ("0x71", "0x72")] == [123, 122]
    assert keycodes.code_in("usb", 28) == 40 and keycodes.code_in("atset2", 28) == 0x5A and keycodes.code_in("usb", 84) is None
    assert keycodes.key_name(183) == "KEY_F13 (Linux 183)" and keycodes.key_name(84) == "Linux key 84"


@pytest.mark.parametrize(
    "args, message",
    [
        (("linux", ["KEY_NOPE"]), "unknown key 'KEY_NOPE' in codeset linux"),
        (("usb", ["VK_RETURN"]), "unknown key 'VK_RETURN' in codeset usb (it has no names, only numbers)"),
        (("usb", ["0xfff"]), "key 0xfff is not a key of codeset usb"),
        (("linux", ["KEY_A"] * 17), "17 keys: at most 16"),
        (("klingon", ["1"]), "unknown codeset 'klingon'"),
        (("osx", ["0x1ff"]), "key 0x1ff is not a key of codeset osx"),
        (("linux", []), "no keys given"),
    ],
)
def test_bad_keys_are_one_line_errors(args: tuple[str, list[str]], message: str) -> None:
    with pytest.raises(UsageError) as err:
        keycodes.parse_keys(*args)
    assert message in str(err.value) and "\n" not in str(err.value)


# libvirt's man pages: the outside oracle (what `virsh send-key` means).
needs_man_pages = pytest.mark.skipif(not manpages.available(), reason="libvirt's man pages (libvirt-clients) are not installed")


@needs_man_pages
def test_every_codeset_virsh_takes_is_taken() -> None:
    documented = manpages.virsh_codesets()
    assert documented == ["linux", "xt", "atset1", "atset2", "atset3", "os_x", "xt_kbd", "win32", "usb", "qnum"]
    # virsh also takes qnum's old name; the test driver runs inside virsh (no daemon), and checks each code.
    for name in [*documented, "rfb"]:
        code = manpages.codes(manpages.PAGES[name])[-1][0]
        virsh = subprocess.run(["virsh", "-c", "test:///default", "send-key", "test", "--codeset", name, str(code)],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        assert virsh.returncode == 0, (name, virsh.stderr)
        assert keycodes.parse_key(name, str(code)) >= 0
    virsh = subprocess.run(["virsh", "-c", "test:///default", "send-key", "test", "--codeset", "klingon", "1"], capture_output=True, text=True)
    assert virsh.returncode != 0 and "unknown codeset" in virsh.stderr


@needs_man_pages
@pytest.mark.parametrize("name", list(manpages.PAGES))
def test_every_row_of_libvirts_man_page_translates_as_it_says(name: str) -> None:
    # virkeycode-SET(7) names each code's key: by its Linux name, or (os_x,
    # win32) by its name in the set, which virkeyname-SET(7) gives the Linux
    # code of.  Every row must translate to that key, as a number in
    # decimal and in hex.
    page = manpages.PAGES[name]
    rows = manpages.codes(page)
    assert len(rows) > 100
    wrong = []
    for code, key in rows:
        expected = manpages.linux_codes_named(manpages.NAMED.get(name, "linux"), key)
        assert expected, (code, key)
        for text in (str(code), hex(code)):
            try:
                got: int | str = keycodes.parse_key(name, text)
            except UsageError as exc:
                got = str(exc)
            if got not in expected:
                wrong.append((hex(code), key, got))
    assert wrong == []


@needs_man_pages
@pytest.mark.parametrize("name", list(manpages.NAMED))
def test_every_name_in_libvirts_man_page_translates_as_it_says(name: str) -> None:
    rows = [(key, linux) for key, linux in manpages.names(manpages.NAMED[name]) if key not in manpages.NO_NAME]
    assert len(rows) > 100
    wrong = []
    for key, linux in rows:
        try:
            got: int | str = keycodes.parse_key(name, key)
        except UsageError as exc:
            got = str(exc)
        if got not in manpages.linux_codes_named(manpages.NAMED[name], key):
            wrong.append((key, linux, got))
    assert wrong == []
