"""`sandbox send-key`: every key arrives as the Linux key libvirt's tables name, or the command fails first.

Keys take one of two routes.  An --x11 sandbox gets them in its nested X
server as XTEST fake input (X keycode = Linux code + 8, so Linux codes up
to the server's last keycode, 255 - 8).  A sandbox's QEMU (--keyboard, or
an attached one) gets them through QMP `send-key`, and there a key exists
only as a QKeyCode: QEMU turns key numbers (qnum) into QKeyCodes through
its own table, and each keyboard model turns QKeyCodes into its own codes
(a virtio keyboard: Linux codes; PS/2: AT set 2; USB: HID usages).  A key
with no QKeyCode in this QEMU (QEMU 7.2 has none for F13-F24, Katakana,
Print, Save, ...) or none in the receiving keyboard's set, a keyboard whose
guest driver is not up, a paused guest, a QEMU without a keyboard: QEMU
drops such keys and still answers success, so this module checks each of
them first and refuses with one line naming the key and the reason.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sandbox.features import keycodes, registry
from sandbox.core.errors import UsageError
from sandbox.backends.direct.monitor import Monitor, MonitorError

log = logging.getLogger(__name__)

VIRTIO = "virtio-keyboard-device"
# QOM type of a keyboard model -> (what it is called, the set it turns QKeyCodes into); virtio: Linux codes.
MODELS: Mapping[str, tuple[str, str]] = {
    VIRTIO: ("virtio keyboard", "linux"),
    "ps2-kbd": ("PS/2 keyboard", "atset2"),
    "usb-kbd": ("USB keyboard", "usb"),
}
SET_WORDS = {"atset2": "AT set 2 code", "usb": "USB HID usage"}
DRIVER_WAIT = 30.0  # s: a sandbox started a moment ago, its guest still loading the keyboard's driver (TCG)
QOM_LIMIT = 5000  # objects: a QEMU's tree has a few hundred; more is not a QEMU we understand


@dataclass(frozen=True)
class Keyboard:
    """One keyboard device of a QEMU."""

    path: str  # in QEMU's object tree
    model: str  # its QOM type
    driver_up: bool | None = None  # virtio: the guest driver is ready (DRIVER_OK); None: unknown or not virtio


@dataclass(frozen=True)
class QemuInput:
    """What a QEMU does with keys sent to it."""

    version: str
    status: str  # QMP query-status: "running", "paused", "prelaunch", ...
    qcodes: frozenset[str]  # its QKeyCode names
    keyboards: tuple[Keyboard, ...]


def qkeycode_names(schema: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    """The QKeyCode names a QEMU takes, from its query-qmp-schema: the enum of send-key's keys' "qcode" data."""
    types = {t["name"]: t for t in schema}

    def member(type_name: str, name: str) -> str:
        return str(next(m["type"] for m in types[type_name]["members"] if m["name"] == name))

    try:
        keys = types[member(types["send-key"]["arg-type"], "keys")]["element-type"]
        qcode = next(v["type"] for v in types[keys]["variants"] if v["case"] == "qcode")
        enum = types[member(qcode, "data")]
        return frozenset(m["name"] for m in enum["members"]) if "members" in enum else frozenset(enum["values"])
    except (KeyError, StopIteration) as exc:
        raise UsageError(f"this QEMU's QMP schema does not describe send-key's QKeyCodes ({exc!r} missing)") from None


def keyboards_in(objects: Sequence[tuple[str, str]]) -> tuple[Keyboard, ...]:
    """The keyboards among a QEMU's (path, QOM type) objects: the models MODELS knows, and anything called one."""
    found = []
    for path, model in objects:
        proxy = model.startswith("virtio-keyboard-") and model != VIRTIO  # -pci, -ccw: the transport around one
        if model in MODELS or (("keyboard" in model or model.endswith("-kbd")) and not proxy):
            found.append(Keyboard(path, model))
    return tuple(found)


def receivers(keyboards: Sequence[Keyboard]) -> tuple[Keyboard, ...]:
    """The keyboards a key may reach: QEMU gives keys to the virtio keyboard its guest drove last, else to its first keyboard.

    A virtio keyboard joins the head of QEMU's handler list when its guest
    driver comes up and leaves it when the driver goes; which of several
    others is first is not visible over QMP, so all of them count.
    """
    up = tuple(k for k in keyboards if k.model == VIRTIO and k.driver_up is not False)
    return up or tuple(k for k in keyboards if k.model != VIRTIO)


def _why_not(linux: int, qemu: QemuInput, keyboard: Keyboard) -> str | None:
    """Why `keyboard` of `qemu` cannot produce Linux key `linux` (None: it can)."""
    table = keycodes.table()
    qcode = table.qcodes.get(linux)
    if linux == 0:
        return "it is not a key (Linux code 0, KEY_RESERVED)"
    if qcode is None:
        return "QEMU takes keys only as QKeyCodes and has no QKeyCode for it"
    if qcode not in qemu.qcodes:
        return f"QEMU {qemu.version} has no QKeyCode {qcode!r} (newer QEMUs have)"
    word, codeset = MODELS.get(keyboard.model, (keyboard.model, ""))
    if codeset == "linux" and table.qcode_keys.get(qcode) != linux:
        return f"QEMU's {word} turns QKeyCode {qcode!r} into another key"
    if codeset in SET_WORDS and keycodes.code_in(codeset, linux) is None:
        return f"its {word} ({keyboard.path}) has no {SET_WORDS[codeset]} for it"
    return None


def qemu_keys(linux: Sequence[int], qemu: QemuInput, who: str) -> list[str]:
    """The QKeyCode names that press `linux` in `qemu`; a UsageError naming the first key it cannot produce, and why."""
    if not qemu.keyboards:
        raise UsageError(f"{who} has no keyboard device: QEMU would drop the keys")
    if qemu.status not in ("running", "suspended"):
        raise UsageError(f"{who}'s guest is stopped (QEMU state {qemu.status!r}): QEMU drops keys until it runs")
    targets = receivers(qemu.keyboards)
    if not targets:
        raise UsageError(f"{who}'s virtio keyboard has no guest driver (yet): QEMU would drop the keys")
    for code in linux:
        for keyboard in targets:
            why = _why_not(code, qemu, keyboard)
            if why:
                raise UsageError(f"cannot send {keycodes.key_name(code)} to {who}: {why}")
    return [keycodes.table().qcodes[code] for code in linux]


def xtest_keycodes(linux: Sequence[int], min_keycode: int, max_keycode: int) -> list[int]:
    """X keycodes (Linux + 8) for `linux`; a UsageError for a key the X server's keycode range cannot hold."""
    for code in linux:
        if code == 0:
            raise UsageError(f"cannot send {keycodes.key_name(code)} through X11: it is not a key")
        if not min_keycode <= code + 8 <= max_keycode:
            raise UsageError(f"cannot send {keycodes.key_name(code)} through X11: "
                             f"X keycodes (Linux code + 8) run from {min_keycode} to {max_keycode}")  # fmt: skip
    return [code + 8 for code in linux]


def qom_objects(qmp: Monitor, root: str = "/machine") -> list[tuple[str, str]]:
    """Every object under `root` in QEMU's composition tree, as (path, QOM type)."""
    found: list[tuple[str, str]] = []
    pending = [root]
    while pending:
        path = pending.pop()
        for prop in qmp.execute("qom-list", 5.0, {"path": path}):
            kind = prop.get("type", "")
            if not (kind.startswith("child<") and kind.endswith(">")):
                continue
            child = f"{path.rstrip('/')}/{prop['name']}"
            model = kind[len("child<") : -1]
            found.append((child, model))
            if model != "qemu:memory-region":  # leaves, and hundreds of them
                pending.append(child)
            if len(found) > QOM_LIMIT:
                raise UsageError(f"QEMU's object tree has more than {QOM_LIMIT} objects: not searching it for keyboards")
    return found


def _driver_up(qmp: Monitor, path: str) -> bool | None:
    try:
        status = qmp.execute("x-query-virtio-status", 5.0, {"path": path})
    except MonitorError as exc:  # QEMU before 7.2 has no such command: unknown
        log.debug("x-query-virtio-status %s: %s", path, exc)
        return None
    return any(s.startswith("VIRTIO_CONFIG_S_DRIVER_OK") for s in status.get("status", {}).get("statuses", []))


def _drivers(qmp: Monitor, keyboards: Sequence[Keyboard]) -> tuple[Keyboard, ...]:
    """`keyboards` with their virtio drivers' state as it is now."""
    return tuple(Keyboard(k.path, k.model, _driver_up(qmp, k.path)) if k.model == VIRTIO else k for k in keyboards)


def probe(qmp: Monitor) -> QemuInput:
    """Ask a QEMU (over QMP) for its version, run state, QKeyCodes and keyboards."""
    v = qmp.execute("query-version", 5.0)["qemu"]
    version = f"{v['major']}.{v['minor']}.{v['micro']}"
    status = qmp.execute("query-status", 5.0)["status"]
    qcodes = qkeycode_names(qmp.execute("query-qmp-schema", 10.0))
    return QemuInput(version, status, qcodes, _drivers(qmp, keyboards_in(qom_objects(qmp))))


def send_key(name: str, codeset: str, hold_ms: int, keys: list[str]) -> None:
    """Press `keys` together and release them after `hold_ms` (as virsh send-key), or refuse before pressing any."""
    from sandbox.features.lifecycle import monitor_path, open_monitor

    linux = keycodes.parse_keys(codeset, keys)
    entry = registry.find(name)
    r = entry.record()
    who = f"sandbox {entry.name!r}"
    if entry.state() != "running":
        raise UsageError(f"{who} is not running")
    if r.x11_display is not None:
        _xtest(r.x11_display, r.x11_auth, linux, hold_ms)
        return
    if not r.keyboard and not r.attached:
        raise UsageError(f"{who} has no keyboard (run it with --keyboard, or --x11)")
    with open_monitor(monitor_path(entry)) as qmp:
        qemu = probe(qmp)
        if not r.attached:
            # Our guests ignore a PS/2 keyboard (i8042.nokbd, q35 has one):
            # only the virtio keyboard of --keyboard counts, once the guest
            # has loaded its driver, a few seconds into a sandbox's life.
            qemu = replace(qemu, keyboards=tuple(k for k in qemu.keyboards if k.model == VIRTIO))
            deadline = time.monotonic() + DRIVER_WAIT
            while qemu.keyboards and not receivers(qemu.keyboards) and time.monotonic() < deadline and entry.running():
                time.sleep(0.2)
                qemu = replace(qemu, keyboards=_drivers(qmp, qemu.keyboards))
        qcodes = qemu_keys(linux, qemu, who)
        # QEMU queues the presses and releases on its timer: the reply comes at once.
        qmp.execute("send-key", 5.0, {"keys": [{"type": "qcode", "data": q} for q in qcodes], "hold-time": hold_ms})


def _xtest(display: int, auth: str, linux: list[int], hold_ms: int) -> None:
    """Keys into an --x11 sandbox's nested X server, as XTEST fake input (X keycode = Linux code + 8)."""
    from Xlib import X, error
    from Xlib import display as xdisplay
    from Xlib.ext import xtest

    os.environ["XAUTHORITY"] = auth
    try:
        d = xdisplay.Display(f":{display}")
    except (error.DisplayError, OSError) as exc:
        raise UsageError(f"the sandbox's nested X server does not answer ({exc})") from None
    try:
        if not d.has_extension("XTEST"):
            raise UsageError("the sandbox's nested X server has no XTEST extension")
        codes = xtest_keycodes(linux, d.display.info.min_keycode, d.display.info.max_keycode)
        for code in codes:
            xtest.fake_input(d, X.KeyPress, code)
        d.sync()
        time.sleep(hold_ms / 1000)
        for code in reversed(codes):
            xtest.fake_input(d, X.KeyRelease, code)
        d.sync()
    finally:
        d.close()
