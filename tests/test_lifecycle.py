"""Named and detached sandboxes on real VMs: run -d, list, info, logs, wait, stop, kill, rm, stale entries."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CLOSED_FD_SCRIPTS, read_pty, SANDBOX, STARTED, popen, run_tracked, run_with_fd_closed
from sandbox.features import keycodes, sendkey

pytestmark = [pytest.mark.vm]


def sb(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return run_tracked([*SANDBOX, *args], timeout=timeout)


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Unique names for this test; whatever is left of them is killed and removed afterwards."""
    made: list[str] = []
    yield made
    for name in made:
        run_tracked([*SANDBOX, "rm", "-f", name], timeout=60)


def fresh(names: list[str]) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    names.append(name)
    return name


def detach(name: str, *cmd: str) -> None:
    detach_opts(name, (), *cmd)


def detach_opts(name: str, opts: tuple[str, ...], *cmd: str) -> None:
    proc = sb("run", "-d", "--name", name, *opts, "--", *cmd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{name}\n".encode()
    # The supervisor runs on: the suite's leftover checks follow it as a launcher of this test's.
    supervisor = listed(all_=True)[name]["launcher_pid"]
    assert isinstance(supervisor, int)
    STARTED.append(supervisor)


def info(name: str) -> dict[str, object]:
    proc = sb("info", "--json", name)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


def listed(all_: bool = False) -> dict[str, dict[str, object]]:
    proc = sb("list", "--json", *(["--all"] if all_ else []))
    assert proc.returncode == 0, proc.stderr
    return {d["name"]: d for d in json.loads(proc.stdout)}


def test_detach_list_info_logs_wait_rm(names: list[str]) -> None:
    server, quick = fresh(names), fresh(names)
    detach(server, "sh", "-c", "echo up; echo err >&2; read x || echo 'stdin is empty'; sleep 30")
    detach(quick, "sh", "-c", "echo bye; exit 7")
    assert sb("wait", quick).returncode == 7
    running = listed()
    assert server in running and quick not in running
    row = running[server]
    command = row["command"]
    assert isinstance(command, list) and command[:2] == ["sh", "-c"]
    assert row["state"] == "running" and row["start"] in ("warm", "cold", "cold, building the template")
    assert isinstance(row["pss_mib"], float) and row["pss_mib"] > 0 and isinstance(row["cpu_s"], float)
    everything = listed(all_=True)
    assert everything[quick]["state"] == "exited" and everything[quick]["exit_status"] == 7
    table = sb("list", "--all").stdout.decode().splitlines()
    assert table[0].split() == ["NAME", "STATE", "COMMAND", "UPTIME", "CPU", "MEMORY", "LABEL", "TAINTED"]
    assert any(line.startswith(quick) and "exited (7)" in line for line in table), table
    info = sb("info", server).stdout.decode()
    fields = dict(line.split(":", 1) for line in info.splitlines())
    assert fields["Name"].strip() == server and fields["State"].strip() == "running"
    assert fields["vCPUs"].strip() == "1" and fields["Memory"].strip() == "512 MiB"
    uuid.UUID(fields["UUID"].strip())
    qemu = int(fields["QEMU PID"])
    assert open(f"/proc/{qemu}/comm").read().startswith("qemu-system")
    assert fields["Tainted"].strip() == "no" and fields["Shares"].strip() == "/ (read-only)"
    deadline = time.monotonic() + 60
    while b"stdin is empty" not in sb("logs", server).stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    # stdout and stderr are separate channels: their lines interleave in any order.
    assert sorted(sb("logs", server).stdout.splitlines()) == [b"err", b"stdin is empty", b"up"]
    assert sb("logs", quick).stdout == b"bye\n"
    assert sb("rm", quick).returncode == 0
    assert quick not in listed(all_=True)
    refused = sb("rm", server)
    assert refused.returncode == 125 and b"is running" in refused.stderr
    assert sb("rm", "-f", server).returncode == 0
    assert server not in listed(all_=True)


def test_stop_signals_the_command_then_powers_off(names: list[str]) -> None:
    polite, stubborn = fresh(names), fresh(names)
    detach(polite, "sh", "-c", "trap 'echo got TERM; exit 5' TERM; echo up; while :; do sleep 1; done")
    detach(stubborn, "sh", "-c", "trap '' TERM; echo up; sleep 100")
    for name in (polite, stubborn):
        deadline = time.monotonic() + 60
        while b"up" not in sb("logs", name).stdout and time.monotonic() < deadline:
            time.sleep(0.2)
    assert sb("stop", polite).stdout == b"5\n"
    # (the shell may also report, on stderr, its `sleep`, which the signal to the process group ended)
    assert [ln for ln in sb("logs", polite).stdout.splitlines() if ln != b"Terminated"] == [b"up", b"got TERM"]
    start = time.monotonic()
    # The grace ran out: the VM was powered off, which is said, and its status is a kill's, as after docker stop.
    stopped = sb("stop", "-t", "2", stubborn)
    assert (stopped.returncode, stopped.stdout) == (0, b"137\n")
    assert stopped.stderr.decode() == f"sandbox: {stubborn}: powered off after 2 s (the command did not exit on SIGTERM)\n"
    assert 2 <= time.monotonic() - start < 20
    assert listed(all_=True)[stubborn]["exit_status"] == 137 and sb("wait", stubborn).returncode == 137
    audit = [json.loads(line) for line in sb("audit", "-n", "50").stdout.decode().splitlines()]
    assert any(e["event"] == "stop-request" and e["name"] == polite for e in audit)
    again = sb("stop", polite)
    assert (again.returncode, again.stderr.decode()) == (125, f"sandbox: sandbox {polite!r} is not running\n")


def test_stop_gives_the_command_all_of_its_grace(names: list[str]) -> None:
    """-t longer than the launcher's own 5 s after a signal: the command's cleanup runs to its end."""
    slow = fresh(names)
    detach(slow, "sh", "-c", "trap 'sleep 7; echo cleaned up; exit 3' TERM; echo up; while :; do sleep 1; done")
    deadline = time.monotonic() + 60
    while b"up" not in sb("logs", slow).stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    stopped = sb("stop", "-t", "30", slow)
    assert (stopped.returncode, stopped.stdout, stopped.stderr) == (0, b"3\n", b"")
    assert b"cleaned up" in sb("logs", slow).stdout


def test_wait_gets_the_status_of_a_detached_rm_sandbox(names: list[str]) -> None:
    ended, waited = fresh(names), fresh(names)
    for name, script in ((ended, "exit 3"), (waited, "sleep 3; exit 4")):
        detach_opts(name, ("--rm",), "sh", "-c", script)
    # It ended before anyone waited: its status is still there for `wait`.
    deadline = time.monotonic() + 60
    while ended in listed() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ended not in listed(all_=True)  # --rm: not listed once ended
    assert sb("wait", ended).stdout == b"3\n" and sb("wait", ended).returncode == 3
    # A waiter that was there first gets it too.
    proc = sb("wait", waited)
    assert (proc.returncode, proc.stdout) == (4, b"4\n"), proc.stderr
    # Once collected, it goes with the next command; its name is free at once.
    time.sleep(1.5)
    for name in (ended, waited):
        gone = sb("info", name)
        assert gone.returncode == 125 and f"no sandbox named {name!r}".encode() in gone.stderr
    again = sb("run", "--rm", "--name", ended, "--", "true")
    assert again.returncode == 0, again.stderr


def test_a_command_with_control_characters_keeps_the_table_whole(names: list[str]) -> None:
    name = fresh(names)
    detach(name, "sh", "-c", "sleep 60", "line1\nline2\t\x1b[31mred")
    table = sb("list").stdout.decode().splitlines()
    rows = [line for line in table if line.startswith(name)]
    assert len(rows) == 1 and "sh -c sleep 60 line1?line2??[…" in rows[0], table  # 30 characters at most
    assert not any(line.startswith(("line2", "\t")) for line in table)
    info = dict(line.split(":", 1) for line in sb("info", name).stdout.decode().splitlines())
    assert info["Command"].strip() == "sh -c sleep 60 line1?line2??[31mred"
    assert listed()[name]["command"] == ["sh", "-c", "sleep 60", "line1\nline2\t\x1b[31mred"]  # JSON: the real argv


def test_kill_ends_qemu_at_once(names: list[str]) -> None:
    name = fresh(names)
    detach(name, "sleep", "100")
    start = time.monotonic()
    assert sb("kill", name).returncode == 0
    assert time.monotonic() - start < 10
    assert listed(all_=True)[name]["exit_status"] == 137
    audit = [json.loads(line) for line in sb("audit", "-n", "50").stdout.decode().splitlines()]
    assert any(e["event"] == "kill" and e["name"] == name for e in audit)


def test_a_launcher_killed_outright_leaves_nothing_after_the_next_command(names: list[str]) -> None:
    name = fresh(names)
    detach(name, "sleep", "100")
    launcher = listed()[name]["launcher_pid"]
    qemu = listed()[name]["qemu_pid"]
    assert isinstance(launcher, int) and isinstance(qemu, int)
    os.kill(launcher, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{qemu}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state == "Z":
            break  # dead, waiting for this machine's slow PID 1 to reap it
        time.sleep(0.1)
    else:
        pytest.fail("QEMU outlived its killed launcher")
    assert name not in listed(all_=True)  # reclaimed: no status, no launcher
    base = "/run/sandbox/sandboxes" if os.geteuid() == 0 else ""
    if base:
        assert name not in os.listdir(base)


def test_names_are_checked(names: list[str]) -> None:
    name = fresh(names)
    detach(name, "sleep", "30")
    taken = sb("run", "-d", "--name", name, "--", "true")
    assert taken.returncode == 125 and b"is taken by a running sandbox" in taken.stderr
    for verb in ("info", "logs", "wait", "stop", "kill"):
        proc = sb(verb, "no-such-sandbox-here")
        assert proc.returncode == 125, verb
        assert proc.stderr.decode().count("\n") == 1 and "no sandbox named 'no-such-sandbox-here'" in proc.stderr.decode()
    bad = sb("run", "--name", "../etc", "--", "true")
    assert bad.returncode == 125 and b"bad sandbox name" in bad.stderr
    tty = sb("run", "-d", "-t", "--", "true")
    assert tty.returncode == 125 and b"--detach runs without a terminal" in tty.stderr


def test_a_foreground_run_is_listed_while_it_runs() -> None:
    proc = popen([*SANDBOX, "run", "--name", f"fg-{os.getpid()}", "--rm", "--", "sh", "-c", "echo up; sleep 5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    assert listed()[f"fg-{os.getpid()}"]["state"] == "running"
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert f"fg-{os.getpid()}" not in listed(all_=True)  # --rm


READ_KEYS = """
import glob, struct, sys
f = open(glob.glob("/dev/input/event*")[0], "rb")
print("ready", flush=True)
got = []
while len(got) < int(sys.argv[1]):
    _s, _u, typ, code, value = struct.unpack("llHHi", f.read(24))
    if typ == 1 and value == 1:  # EV_KEY, pressed
        got.append(code)
print(*got)
"""


def test_send_key_reaches_a_guest_program_in_every_set(names: list[str], tmp_path: Path) -> None:
    script = tmp_path / "keys.py"
    script.write_text(READ_KEYS)
    name = fresh(names)
    detach_opts(name, ("--keyboard",), "/usr/bin/python3", str(script), "6")
    deadline = time.monotonic() + 120
    while b"ready" not in sb("logs", name).stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    sends = [("linux", ["KEY_A"]), ("xt", ["0x30"]), ("usb", ["6"]), ("win32", ["VK_RETURN"]),
             ("linux", ["KEY_LEFTCTRL", "KEY_C"])]  # fmt: skip
    for codeset, keys in sends:
        proc = sb("send-key", name, "--codeset", codeset, "--holdtime", "50", *keys)
        assert proc.returncode == 0, proc.stderr
    assert sb("wait", name).returncode == 0
    # a, b, c, Return, then Ctrl and C pressed together
    assert sb("logs", name).stdout.splitlines()[-1].split() in ([b"30", b"48", b"46", b"28", b"29", b"46"], [b"30", b"48", b"46", b"28", b"46", b"29"])


PRINT_KEYS = """
import glob, struct
f = open(glob.glob("/dev/input/event*")[0], "rb")
print("ready", flush=True)
while True:
    _s, _u, typ, code, value = struct.unpack("llHHi", f.read(24))
    if typ == 1 and value == 1:  # EV_KEY, pressed
        print(code, flush=True)
"""
# Pressed alone, never in a chord: Ctrl-Alt-Del reboots a Linux guest, Alt-SysRq-<key> runs a SysRq command.
ALONE = {29, 42, 54, 56, 97, 99, 100, 125, 126}


def qemu_pressable() -> list[int]:
    """The Linux keys QEMU has a QKeyCode for, read from the installed QEMU's QMP schema."""
    # quit is sent only once the schema's reply has been read whole: QEMU drops stdio output still queued when it
    # quits, and the schema is larger than a pipe (CI once read it cut at 128 KiB).
    with subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b'{"execute":"qmp_capabilities"}\n{"execute":"query-qmp-schema"}\n')
        proc.stdin.flush()
        schema: list[Any] | None = None
        for line in proc.stdout:
            reply = json.loads(line)
            if isinstance(reply.get("return"), list):
                schema = reply["return"]
                break
        proc.stdin.write(b'{"execute":"quit"}\n')
        proc.stdin.close()
        proc.wait(timeout=60)
    assert schema is not None
    table = keycodes.table()
    return sorted({table.qcode_keys[q] for q in sendkey.qkeycode_names(schema) - {"unmapped"}})


@pytest.mark.parametrize("machine", ["microvm", "q35"])  # q35 has a PS/2 keyboard too, which our guests ignore
def test_send_key_presses_every_key_qemu_can_and_refuses_the_rest(names: list[str], tmp_path: Path, machine: str) -> None:
    script = tmp_path / "keys.py"
    script.write_text(PRINT_KEYS)
    name = fresh(names)
    detach_opts(name, ("--keyboard", "--machine", machine), "/usr/bin/python3", str(script))
    deadline = time.monotonic() + 120
    while b"ready" not in sb("logs", name).stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    # Keys that were "sent" and never arrived: each refused in one line, and nothing pressed.
    for codeset, key, why in [("linux", "KEY_F13", "has no QKeyCode 'f13'"), ("usb", "115", "has no QKeyCode 'f24'"),
                              ("linux", "KEY_KATAKANA", "has no QKeyCode for it"), ("linux", "KEY_PRINT", "has no QKeyCode for it"),
                              ("win32", "VK_F20", "has no QKeyCode 'f20'"), ("linux", "KEY_SAVE", "has no QKeyCode for it"),
                              ("linux", "KEY_REWIND", "has no QKeyCode for it"), ("linux", "KEY_KPJPCOMMA", "has no QKeyCode for it")]:  # fmt: skip
        proc = sb("send-key", name, "--codeset", codeset, {"linux": "KEY_A", "usb": "4", "win32": "VK_A"}[codeset], key)
        err = proc.stderr.decode()
        assert proc.returncode == 125 and err.count("\n") == 1 and f"cannot send KEY_" in err and why in err, err
    # Hanja (123) and Hangeul (122), in every set that has them (they went out as qnum 0xf1/0xf2, which QEMU 7.2
    # drops), and xt_kbd's KP = (117) and KP Enter (96), which it read from the wrong column or refused.
    sent: list[int] = []
    for codeset, keys, linux in [("linux", ["KEY_HANJA", "KEY_HANGEUL"], [123, 122]), ("atset1", ["0xf1", "0x72"], [123, 122]),
                                 ("xt_kbd", ["0xf1", "0xf2"], [123, 122]), ("qnum", ["0x71", "0x72"], [123, 122]),
                                 ("rfb", ["0x71"], [123]), ("atset2", ["0xf2"], [122]), ("win32", ["VK_HANJA", "VK_HANGEUL"], [123, 122]),
                                 ("usb", ["145", "144"], [123, 122]), ("os_x", ["0x66", "kVK_JIS_Kana"], [123, 122]),
                                 ("xt_kbd", ["0x59", "0x11c"], [117, 96])]:  # fmt: skip
        assert [keycodes.parse_key(codeset, k) for k in keys] == linux
        proc = sb("send-key", name, "--codeset", codeset, "--holdtime", "10", *keys)
        assert proc.returncode == 0, proc.stderr
        sent += linux
    # Then every key this QEMU has a QKeyCode for, as Linux numbers in chords of up to 16.
    pressable = qemu_pressable()
    assert len(pressable) == 147
    chords = [[k] for k in pressable if k in ALONE]
    rest = [k for k in pressable if k not in ALONE]
    chords += [rest[i : i + 16] for i in range(0, len(rest), 16)]
    for chord in chords:
        proc = sb("send-key", name, "--holdtime", "10", *map(str, chord))
        assert proc.returncode == 0, proc.stderr
        sent += chord
    deadline = time.monotonic() + 60
    while len(got := sb("logs", name).stdout.split()[1:]) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [int(code) for code in got] == sent


@pytest.mark.parametrize(
    "args, message",
    [
        (["--codeset", "linux", "KEY_NOPE"], "unknown key 'KEY_NOPE' in codeset linux"),
        (["--codeset", "usb", "KEY_A"], "unknown key 'KEY_A' in codeset usb (it has no names, only numbers)"),
        (["--codeset", "xt", "0x7ff"], "key 0x7ff is not a key of codeset xt"),
        (["--codeset", "dvorak", "1"], "unknown codeset 'dvorak'"),
        (["KEY_A"] * 17, "17 keys: at most 16 can be pressed at once"),
        (["--holdtime", "-5", "KEY_A"], "--holdtime -5: must not be negative"),
    ],
)
def test_send_key_bad_input_is_one_line(args: list[str], message: str) -> None:
    proc = sb("send-key", "no-such-sandbox-here", *args)
    assert proc.returncode == 125
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and message in err, err


def test_send_key_needs_a_keyboard(names: list[str]) -> None:
    name = fresh(names)
    detach(name, "sleep", "30")
    proc = sb("send-key", name, "KEY_A")
    assert proc.returncode == 125 and b"has no keyboard (run it with --keyboard, or --x11)" in proc.stderr


def test_exec_runs_beside_the_command(names: list[str], tmp_path: Path) -> None:
    name = fresh(names)
    detach(name, "sh", "-c", "echo server up; sleep 60")
    data = [os.urandom(3 << 20), os.urandom(1 << 20)]
    procs = []
    for i, blob in enumerate(data):
        src = tmp_path / f"in{i}"
        src.write_bytes(blob)
        with src.open("rb") as stdin:
            procs.append(popen([*SANDBOX, "exec", name, "--", "sh", "-c", f"cat; echo to-stderr-{i} >&2; exit {3 + i}"],
                               stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    for i, (proc, blob) in enumerate(zip(procs, data)):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 3 + i, err
        assert hashlib.sha256(out).hexdigest() == hashlib.sha256(blob).hexdigest()
        assert err == f"to-stderr-{i}\n".encode()
    same = sb("exec", "-e", "EXTRA=1", name, "--", "sh", "-c", "id -u; pwd; echo $EXTRA")
    assert same.returncode == 0 and same.stdout.decode().split() == [str(os.getuid()), os.getcwd(), "1"]
    assert sb("exec", name, "--", "no-such-command-here").returncode == 127
    long = popen([*SANDBOX, "exec", name, "--", "sh", "-c", "echo started; sleep 60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert long.stdout is not None and long.stdout.readline() == b"started\n"
    long.send_signal(signal.SIGTERM)
    long.communicate(timeout=60)
    assert long.returncode == 128 + signal.SIGTERM
    assert listed()[name]["state"] == "running"  # the sandbox's own command goes on
    bad = sb("exec", "no-such-sandbox-here", "--", "true")
    assert bad.returncode == 125 and b"no sandbox named" in bad.stderr
    for fd, script in CLOSED_FD_SCRIPTS.items():  # `sandbox exec ... >&-` as `sandbox run ... >&-`
        argv = ["sh", "-c", script]
        assert run_with_fd_closed([*SANDBOX, "exec", name, "--", *argv], fd) == run_with_fd_closed(argv, fd, timeout=30), fd


def test_exec_with_a_terminal(names: list[str]) -> None:
    import fcntl
    import pty
    import struct
    import termios

    name = fresh(names)
    detach(name, "sleep", "60")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = popen([*SANDBOX, "exec", "-t", name, "--", "sh", "-c", "tty; stty size; exit 6"], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = read_pty(master, 60)
    assert proc.wait(60) == 6, out
    lines = out.decode(errors="replace").replace("\r", "").splitlines()
    assert lines[0].startswith("/dev/pts/"), lines
    assert "30 100" in lines, lines


def test_an_exec_while_the_template_is_built_leaves_nothing_in_it(names: list[str], tmp_path: Path) -> None:
    """`sandbox exec` at once after the first `run -d` (which builds the template): its data stays out of the template."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    first, second = fresh(names), fresh(names)
    proc = run_tracked([*SANDBOX, "run", "-d", "--name", first, "--", "sleep", "60"], env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    STARTED.append(listed(all_=True)[first]["launcher_pid"])  # type: ignore[arg-type]
    # Sent while the guest boots and is snapshotted: it must wait for the command to run.
    blob = os.urandom(1 << 20)
    p = run_tracked([*SANDBOX, "exec", first, "--", "sh", "-c", "cat > /dev/null; echo done"], input=blob, env=env, timeout=240)
    assert p.returncode == 0 and p.stdout == b"done\n", p.stderr
    assert info(first)["start"] == "cold, building the template"
    run_tracked([*SANDBOX, "rm", "-f", first], env=env)
    # A sandbox restored from that template: its exec channel carries its own bytes only.
    proc = run_tracked([*SANDBOX, "run", "-d", "--name", second, "--", "sleep", "60"], env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    STARTED.append(listed(all_=True)[second]["launcher_pid"])  # type: ignore[arg-type]
    assert info(second)["start"] == "warm"
    p = run_tracked([*SANDBOX, "exec", second, "--", "sh", "-c", "cat; exit 4"], input=b"clean\n", env=env)
    assert (p.returncode, p.stdout, p.stderr) == (4, b"clean\n", b"")
