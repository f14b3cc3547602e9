"""Machine lifecycle and its monitor, against a real QEMU with no guest (-machine none)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from sandbox.qemu.machine import Machine
from sandbox.qemu.monitor import Monitor


def test_monitor_gives_up_on_a_silent_peer() -> None:
    ours, theirs = socket.socketpair()
    try:
        start = time.monotonic()
        mon = Monitor(ours)
        assert mon.connect(0.3) is False
        mon.close()
        assert time.monotonic() - start < 2
    finally:
        ours.close()
        theirs.close()


def test_wait_running_then_a_soft_stop_over_qmp(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    argv = ["qemu-system-x86_64", "-machine", "none", "-display", "none", "-nodefaults", "-S",
            "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control"]  # fmt: skip
    machine = Machine(argv, (theirs.fileno(),), tmp_path, {"PATH": "/usr/bin:/bin"}, tmp_path / "qemu.log", monitor=ours)
    try:
        with machine:
            theirs.close()
            assert machine.wait_running(10.0)
            assert machine.qmp is not None and machine.qmp.connected
            # `quit` over QMP: QEMU exits by itself with status 0 (a SIGKILL would be -9).
            assert machine.stop(soft_timeout=5.0) == 0
        assert machine.qmp is None
    finally:
        ours.close()
