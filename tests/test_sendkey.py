"""send-key's delivery checks: what a real QEMU says about its keys and keyboards, and which keys each route refuses.

The QEMUs here boot no guest (paused, or running without a kernel); the
keys' arrival in a guest is tested in test_lifecycle.py and test_x11.py.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import manpages
import pytest

from sandbox.features import keycodes, sendkey
from sandbox.core.errors import UsageError
from sandbox.backends.direct.monitor import Monitor


@contextmanager
def qemu(tmp_path: Path, *args: str) -> Iterator[Monitor]:
    """A QEMU of this test's own with the given arguments, and a QMP session on it; killed afterwards."""
    sock_path = tmp_path / f"qmp-{time.monotonic_ns()}.sock"
    proc = subprocess.Popen(["qemu-system-x86_64", "-nodefaults", "-display", "none", "-qmp", f"unix:{sock_path},server=on,wait=off", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        deadline = time.monotonic() + 30
        while not sock_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        sock.connect(str(sock_path))
        yield Monitor(sock)
    finally:
        sock.close()
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def qemu_72(tmp_path_factory: pytest.TempPathFactory) -> sendkey.QemuInput:
    """The QEMU installed here as send-key sees it, with one virtio keyboard whose guest driver is up."""
    with qemu(tmp_path_factory.mktemp("q"), "-machine", "none", "-S") as qmp:
        found = sendkey.probe(qmp)
    return sendkey.QemuInput(found.version, "running", found.qcodes, (sendkey.Keyboard("/kbd", sendkey.VIRTIO, True),))


def test_a_qemu_reports_its_qkeycodes_state_and_keyboards(tmp_path: Path) -> None:
    with qemu(tmp_path, "-machine", "microvm", "-S") as qmp:
        bare = sendkey.probe(qmp)
    assert bare.status == "prelaunch" and bare.keyboards == ()
    assert bare.version.startswith("7.2.")  # the facts below are QEMU 7.2's
    assert {"a", "ret", "lang1", "lang2", "kp_comma", "print", "sysrq"} <= bare.qcodes and "f13" not in bare.qcodes
    assert len(bare.qcodes) == 150
    # Running without a kernel: its virtio keyboard has no driver.
    with qemu(tmp_path, "-machine", "microvm", "-device", "virtio-keyboard-device") as qmp:
        virtio = sendkey.probe(qmp)
    assert virtio.status == "running" and virtio.keyboards == (sendkey.Keyboard("/machine/peripheral-anon/device[0]", sendkey.VIRTIO, False),)
    with qemu(tmp_path, "-machine", "q35", "-S", "-device", "qemu-xhci", "-device", "usb-kbd", "-device", "virtio-keyboard-pci") as qmp:
        pc = sendkey.probe(qmp)
    assert sorted(k.model for k in pc.keyboards) == ["ps2-kbd", "usb-kbd", sendkey.VIRTIO]
    # No guest drives the virtio keyboard: QEMU's first keyboards get the keys.
    assert sorted(k.model for k in sendkey.receivers(pc.keyboards)) == ["ps2-kbd", "usb-kbd"]


LOST = ["KEY_F13", "KEY_F14", "KEY_F20", "KEY_F24", "KEY_PRINT", "KEY_SAVE", "KEY_KATAKANA", "KEY_KPJPCOMMA", "KEY_REWIND"]


def test_qemu_72_presses_qkeycodes_and_refuses_what_it_has_none_for(qemu_72: sendkey.QemuInput) -> None:
    def plan(*keys: str) -> list[str]:
        return sendkey.qemu_keys(keycodes.parse_keys("linux", list(keys)), qemu_72, "sandbox 'k'")

    assert plan("KEY_A", "KEY_HANJA", "KEY_HANGEUL", "KEY_KPCOMMA", "KEY_RO") == ["a", "lang2", "lang1", "kp_comma", "ro"]
    assert plan("KEY_SYSRQ") in (["sysrq"], ["print"])  # QEMU turns both into KEY_SYSRQ
    for key in LOST:
        with pytest.raises(UsageError) as err:
            plan("KEY_A", key)  # nothing is pressed when one key cannot be
        message = str(err.value)
        assert message.startswith(f"cannot send {key} (Linux ") and "\n" not in message
        if key.startswith("KEY_F"):
            assert message.endswith(f"QEMU {qemu_72.version} has no QKeyCode 'f{key[5:]}' (newer QEMUs have)")
        else:
            assert message.endswith("QEMU takes keys only as QKeyCodes and has no QKeyCode for it")
    with pytest.raises(UsageError, match=r"cannot send KEY_RESERVED \(Linux 0\) to sandbox 'k': it is not a key"):
        plan("KEY_RESERVED")


@pytest.mark.skipif(not manpages.available(), reason="libvirt's man pages (libvirt-clients) are not installed")
def test_qemu_72_can_press_147_linux_keys_into_a_virtio_keyboard(qemu_72: sendkey.QemuInput) -> None:
    # Every Linux key libvirt knows: those QEMU 7.2 has a QKeyCode for go
    # out as that QKeyCode, the others are refused; test_lifecycle.py
    # presses the first kind in a guest.
    pressed, refused = {}, []
    for linux, _ in manpages.codes("linux"):
        try:
            pressed[linux] = sendkey.qemu_keys([linux], qemu_72, "s")[0]
        except UsageError as exc:
            refused.append(str(exc))
    assert len(pressed) == 147 and len(refused) == 454 - 147
    # Every QKeyCode but "unmapped" names one of them (print and sysrq both KEY_SYSRQ, asterisk and kp_multiply KEY_KPASTERISK).
    assert {keycodes.table().qcode_keys[q] for q in qemu_72.qcodes - {"unmapped"}} == set(pressed)
    assert all("QKeyCode" in why or "not a key" in why for why in refused)


def test_the_keyboard_that_gets_the_keys_decides(qemu_72: sendkey.QemuInput) -> None:
    up, down = sendkey.Keyboard("/v", sendkey.VIRTIO, True), sendkey.Keyboard("/v", sendkey.VIRTIO, False)
    ps2, usb = sendkey.Keyboard("/i8042/ps2kbd", "ps2-kbd"), sendkey.Keyboard("/usb", "usb-kbd")
    assert sendkey.receivers([ps2, up]) == (up,) and sendkey.receivers([ps2, down]) == (ps2,)
    assert sendkey.receivers([down]) == () and sendkey.receivers([ps2, usb]) == (ps2, usb)

    def plan(keyboards: tuple[sendkey.Keyboard, ...], key: str, status: str = "running") -> list[str]:
        target = sendkey.QemuInput(qemu_72.version, status, qemu_72.qcodes, keyboards)
        return sendkey.qemu_keys(keycodes.parse_keys("linux", [key]), target, "sandbox 'k'")

    assert plan((ps2, up), "KEY_MENU") == ["menu"]  # the virtio keyboard has it
    for keyboards, key, status, message in [
        ((ps2, down), "KEY_MENU", "running", "cannot send KEY_MENU (Linux 139) to sandbox 'k': its PS/2 keyboard (/i8042/ps2kbd) has no AT set 2 code for it"),
        ((usb,), "KEY_MAIL", "running", "cannot send KEY_MAIL (Linux 155) to sandbox 'k': its USB keyboard (/usb) has no USB HID usage for it"),
        ((), "KEY_A", "running", "sandbox 'k' has no keyboard device: QEMU would drop the keys"),
        ((down,), "KEY_A", "running", "sandbox 'k''s virtio keyboard has no guest driver (yet): QEMU would drop the keys"),
        ((up,), "KEY_A", "paused", "sandbox 'k''s guest is stopped (QEMU state 'paused'): QEMU drops keys until it runs"),
    ]:  # fmt: skip
        with pytest.raises(UsageError) as err:
            plan(keyboards, key, status)
        assert str(err.value) == message


def test_xtest_takes_the_x_servers_keycode_range() -> None:
    assert sendkey.xtest_keycodes([1, 183, 247], 8, 255) == [9, 191, 255]
    for linux, message in [(0x100, "cannot send BTN_0 (Linux 256) through X11: X keycodes (Linux code + 8) run from 8 to 255"),
                           (0, "cannot send KEY_RESERVED (Linux 0) through X11: it is not a key")]:  # fmt: skip
        with pytest.raises(UsageError) as err:
            sendkey.xtest_keycodes([30, linux], 8, 255)
        assert str(err.value) == message


def test_the_qom_walk_finds_nested_keyboards(tmp_path: Path) -> None:
    with qemu(tmp_path, "-machine", "q35", "-S", "-device", "virtio-keyboard-pci") as qmp:
        objects = sendkey.qom_objects(qmp)
    assert len(objects) > 100 and len(objects) == len(set(objects))
    kinds = {model: path for path, model in objects}
    assert kinds["ps2-kbd"].endswith("/ps2kbd") and kinds[sendkey.VIRTIO].endswith("/virtio-backend")
    assert sendkey.keyboards_in(objects) == tuple(sendkey.Keyboard(p, m) for p, m in objects if m in ("ps2-kbd", sendkey.VIRTIO))
