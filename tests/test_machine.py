"""Machine lifecycle and its monitor, against a real QEMU with no guest (-machine none)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.backends.direct.machine import Machine
from sandbox.backends.direct.monitor import Monitor, MonitorError


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


@contextlib.contextmanager
def bare_qemu(tmp_path: Path) -> Iterator[Machine]:
    """A paused QEMU with no guest, its monitor on a socketpair; ended, reaped and closed on exit."""
    ours, theirs = socket.socketpair()
    argv = ["qemu-system-x86_64", "-machine", "none", "-display", "none", "-nodefaults", "-S",
            "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control"]  # fmt: skip
    machine = Machine(argv, (theirs.fileno(),), tmp_path, {"PATH": "/usr/bin:/bin"}, tmp_path / "qemu.log", monitor=ours)
    try:
        with machine:
            theirs.close()
            yield machine
    finally:
        ours.close()
        theirs.close()


def test_wait_running_then_a_soft_stop_over_qmp(tmp_path: Path) -> None:
    with bare_qemu(tmp_path) as machine:
        assert machine.wait_running(10.0)
        assert machine.qmp is not None and machine.qmp.connected
        # `quit` over QMP: QEMU exits by itself with status 0 (a SIGKILL would be -9).
        assert machine.stop(soft_timeout=5.0) == 0
    assert machine.qmp is None


def test_monitor_commands_errors_events_and_descriptors(tmp_path: Path) -> None:
    """The monitor client against a real QEMU: results, error replies, events in between, SCM_RIGHTS."""
    with bare_qemu(tmp_path) as machine:
        mon = machine.monitor_session(10.0)
        assert mon is not None
        assert mon.execute("query-status", 5.0) == {"status": "prelaunch", "singlestep": False, "running": False}
        with pytest.raises(MonitorError, match="no-such-command"):
            mon.execute("no-such-command", 5.0)
        # `cont` makes QEMU emit a RESUME event before the next reply: skipped, not taken for it.
        mon.execute("cont", 5.0)
        assert mon.execute("query-status", 5.0)["running"] is True
        # A descriptor handed over, then found by its name (closefd knows it, and forgets it).
        r, w = os.pipe()
        try:
            mon.send_fd(w, "handed", 5.0)
            mon.execute("closefd", 5.0, {"fdname": "handed"})
            with pytest.raises(MonitorError, match="handed"):
                mon.execute("closefd", 5.0, {"fdname": "handed"})
        finally:
            os.close(r)
            os.close(w)
        assert machine.stop(soft_timeout=5.0) == 0
        # After QEMU is gone: an error, not a hang.
        with pytest.raises((MonitorError, OSError)):
            mon.execute("query-status", 1.0)
