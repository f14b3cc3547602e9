"""A first run's slow builds say what they do on a terminal, in one line that is erased before the command's output."""

from __future__ import annotations

import os
import pty
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SANDBOX, popen, read_pty, run_sandbox
from sandbox.image import host
from sandbox.core import progress


def screen(raw: bytes) -> list[str]:
    """What a terminal shows after `raw`: carriage returns, erase to the end of the line, newlines."""
    lines, col, text, i = [""], 0, raw.decode(errors="replace"), 0
    while i < len(text):
        if text.startswith(progress.ERASE[1:], i):  # ESC [ K
            lines[-1] = lines[-1][:col]
            i += 3
            continue
        c = text[i]
        if c == "\r":
            col = 0
        elif c == "\n":
            lines.append("")
            col = 0
        else:
            lines[-1] = lines[-1][:col] + c + lines[-1][col + 1 :]
            col += 1
        i += 1
    return [line for line in lines if line]


def test_screen_emulation() -> None:
    assert screen(b"abc\r\x1b[Kxy\r\n\r\x1b[Kworking...\r\x1b[Kdone\r\n") == ["xy", "done"]


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    master, slave = pty.openpty()
    yield master, slave
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:
            pass


def test_the_line_is_drawn_and_erased_on_a_terminal_only(terminal: tuple[int, int], tmp_path: Path) -> None:
    master, slave = terminal
    with os.fdopen(os.dup(slave), "w") as tty, (tmp_path / "file").open("w") as file:
        try:
            progress.use(tty)
            with progress.step("building a"):
                with progress.step("building b"):
                    pass
            progress.use(file)  # not a terminal: nothing
            with progress.step("building c"):
                pass
        finally:
            progress.use(None)
    os.close(slave)
    raw = read_pty(master, 5)
    assert raw == b"\r\x1b[Ksandbox: building a...\r\x1b[Ksandbox: building b...\r\x1b[K\r\x1b[Ksandbox: building a...\r\x1b[K"
    assert screen(raw) == []
    assert (tmp_path / "file").read_text() == ""


def run_on_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, bytes]:
    """`argv` with stdout and stderr on a pty (stdin /dev/null); its status and everything it wrote there."""
    master, slave = pty.openpty()
    proc = popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd="/")
    os.close(slave)
    out = read_pty(master, 240)
    return proc.wait(60), out


@pytest.mark.vm
def test_a_first_run_on_a_terminal_says_what_it_builds(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), XDG_STATE_HOME=str(tmp_path / "state"))
    env.pop("SANDBOX_ACCEL", None)
    status, raw = run_on_terminal([*SANDBOX, "run", "--", "echo", "hello"], env)
    assert status == 0, raw
    for doing in (b"sandbox: building the guest image (its kernel)...", b"sandbox: building the guest image (its init)...",
                  b"sandbox: building the guest image (its initramfs)...", b"sandbox: building the warm-start template..."):  # fmt: skip
        assert doing in raw, raw
    no_kvm = host.kvm_problem(host.cpu_flags(), host.loaded_modules(), os.access("/dev/kvm", os.R_OK | os.W_OK)) is not None
    # Erased: the terminal shows the command's output (and, without KVM, the notice) alone.
    assert screen(raw) == ([line for line in screen(raw) if "KVM unavailable" in line] if no_kvm else []) + ["hello"], raw
    assert (b"KVM unavailable" in raw) == no_kvm
    # Built: the next run says nothing of its own, not even the notice (said once for this user, terminal or not).
    status, raw = run_on_terminal([*SANDBOX, "run", "--", "echo", "hello"], env)
    assert (status, raw) == (0, b"hello\r\n")
    # Not on a terminal: no line (a fresh cache: the image is built again).
    proc = run_sandbox("echo", "hello", run_opts=("--cold",), env=dict(env, XDG_CACHE_HOME=str(tmp_path / "cache2")), cwd="/")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"hello\n", b"")
