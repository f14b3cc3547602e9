"""`sandbox attach`: a QEMU launched by hand (paused with -S: no guest needed) is described, tainted, listed and steered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SANDBOX, run_tracked
from sandbox.features import attach

HAND = ["-machine", "microvm", "-m", "256", "-smp", "1", "-nodefaults", "-display", "none", "-S"]


def sb(*args: str) -> subprocess.CompletedProcess[bytes]:
    return run_tracked([*SANDBOX, *args], timeout=60)


@pytest.fixture
def hand_qemu(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """A QEMU of the test's own, with a QMP socket, a 9p export and a disk; killed afterwards whatever happens."""
    name = f"hand-{os.getpid()}-{time.monotonic_ns() % 100000}"
    sock = tmp_path / "qmp.sock"
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    argv = ["qemu-system-x86_64", "-name", f"guest={name}", *HAND, "-qmp", f"unix:{sock},server=on,wait=off",
            "-fsdev", f"local,id=f0,path={tmp_path},security_model=none,readonly=on",
            "-device", "virtio-9p-device,fsdev=f0,mount_tag=t",
            "-drive", f"if=none,file={disk},format=raw,id=d0"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield proc, name, tmp_path
    finally:
        proc.kill()
        proc.wait()
        run_tracked([*SANDBOX, "rm", "-f", name], timeout=30)


def test_describe_reads_the_command_line() -> None:
    d = attach.describe(["qemu-system-x86_64", "-name", "guest=web,debug-threads=on", "-M", "q35,accel=kvm", "-m", "2G",
                         "-smp", "cpus=4", "-kernel", "/boot/vmlinuz", "-chardev", "socket,id=m,path=/run/a,,b.sock,server=on",
                         "-mon", "chardev=m,mode=control", "-drive", "file=/var/a.qcow2,if=virtio", "-hda", "/b.img",
                         "-virtfs", "local,path=/srv,mount_tag=s,security_model=none", "-netdev", "user,id=n0",
                         "-sandbox", "on", "-S"])  # fmt: skip
    assert (d.name, d.machine, d.accel, d.memory_mb, d.cpus, d.kernel) == ("web", "q35", "kvm", 2048, 4, "/boot/vmlinuz")
    assert d.monitor == "/run/a,b.sock"
    assert d.disks == ("/var/a.qcow2", "/b.img") and d.shares == ("/srv (read-write)",) and d.network == ("user",)
    assert d.sandboxed
    bare = attach.describe(["qemu-system-x86_64", "-qmp", "unix:/tmp/q.sock,server,nowait", "-m", "512M"])
    assert (bare.name, bare.monitor, bare.memory_mb, bare.cpus, bare.sandboxed) == (None, "/tmp/q.sock", 512, 1, False)
    assert attach.describe(["qemu-system-x86_64", "-monitor", "stdio"]).monitor is None


def test_attached_qemu_is_listed_tainted_described_and_stopped(hand_qemu: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    proc, name, share = hand_qemu
    out = sb("attach", str(proc.pid))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{name}\n".encode()
    rows = {d["name"]: d for d in json.loads(sb("list", "--json").stdout)}
    row = rows[name]
    assert row["state"] == "running" and row["qemu_pid"] == proc.pid
    assert (row["attached"], row["detached"]) == (True, False)  # not a sandbox of ours run in the background
    assert row["tainted"] == ["externally launched", "custom monitor", "runs as root", "unconfined"]
    table = sb("list").stdout.decode()
    assert any(line.startswith(name) and "yes: externally launched" in line for line in table.splitlines()), table
    info = dict(line.split(":", 1) for line in sb("info", name).stdout.decode().splitlines())
    assert info["Memory"].strip() == "256 MiB" and info["vCPUs"].strip() == "1" and info["Machine"].strip() == "microvm"
    assert info["Shares"].strip() == f"{share} (read-only)" and info["Disks"].strip() == str(share / "disk.img")
    assert info["Monitor"].strip() == str(share / "qmp.sock")
    no_keyboard = sb("send-key", name, "--codeset", "win32", "VK_RETURN")  # -nodefaults microvm: keys would go nowhere
    assert no_keyboard.returncode == 125 and no_keyboard.stderr == f"sandbox: sandbox {name!r} has no keyboard device: QEMU would drop the keys\n".encode()
    no_exec = sb("exec", name, "--", "true")
    assert no_exec.returncode == 125 and b"was attached, not started here: exec needs the sandbox's own guest init" in no_exec.stderr
    for again in ([], ["--name", f"{name}-again"]):  # the same QEMU, under its name or another
        refused = sb("attach", str(proc.pid), *again)
        assert (refused.returncode, refused.stderr.decode()) == (125, f"sandbox: QEMU {proc.pid} is already attached as sandbox {name!r}\n")
    assert f"{name}-again" not in {d["name"] for d in json.loads(sb("list", "--json", "--all").stdout)}
    no_log = sb("logs", name)
    assert (no_log.returncode, no_log.stderr.decode()) == (
        125, f"sandbox: sandbox {name!r} is an attached QEMU: it has no log of ours (its output went where its launcher sent it)\n")  # fmt: skip
    start = time.monotonic()
    stopped = sb("stop", "-t", "1", name)  # the paused guest ignores the power button: then quit
    assert (stopped.returncode, stopped.stdout) == (0, b"stopped\n")
    assert stopped.stderr.decode() == f"sandbox: {name}: quit QEMU after 1 s (the guest did not power off on the power button)\n"
    assert proc.wait(10) == 0 and time.monotonic() - start < 10
    assert name not in {d["name"] for d in json.loads(sb("list", "--json", "--all").stdout)}


def test_attached_qemu_can_be_killed(hand_qemu: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    proc, name, _ = hand_qemu
    empty = sb("attach", str(proc.pid), "--name", "")
    assert (empty.returncode, empty.stderr.decode()) == (125, "sandbox: bad sandbox name '' (letters, digits, '_', '.', '-'; 64 at most)\n")
    assert sb("attach", str(proc.pid), "--name", name).returncode == 0
    assert sb("kill", name).returncode == 0
    assert proc.wait(10) == -signal.SIGKILL


def test_attach_refuses_what_it_cannot_steer(tmp_path: Path) -> None:
    no_monitor = subprocess.Popen(["qemu-system-x86_64", *HAND], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        for pid, message in ((no_monitor.pid, f"QEMU {no_monitor.pid} has no QMP monitor on a UNIX socket"),
                             (os.getpid(), f"process {os.getpid()} is not QEMU"), (999999999, "no process 999999999")):  # fmt: skip
            proc = sb("attach", str(pid))
            err = proc.stderr.decode()
            assert proc.returncode == 125 and err.count("\n") == 1 and message in err, err
    finally:
        no_monitor.kill()
        no_monitor.wait()


@pytest.mark.parametrize(
    "args, keys, message",
    [
        (["-machine", "microvm", "-S", "-device", "virtio-keyboard-device"], ["KEY_A"], "'s guest is stopped (QEMU state 'prelaunch'): QEMU drops keys until it runs"),
        (["-machine", "microvm", "-device", "virtio-keyboard-device"], ["KEY_A"], "'s virtio keyboard has no guest driver (yet): QEMU would drop the keys"),
        (["-machine", "q35"], ["KEY_A", "KEY_MENU"], "cannot send KEY_MENU (Linux 139) to sandbox {name!r}: its PS/2 keyboard (/machine/unattached/device[11]/ps2kbd) has no AT set 2 code for it"),
        (["-machine", "q35"], ["KEY_A", "KEY_F24"], "cannot send KEY_F24 (Linux 194) to sandbox {name!r}: QEMU 7.2."),
        (["-machine", "q35"], ["KEY_A", "KEY_LEFTCTRL"], None),
    ],
)  # fmt: skip
def test_send_key_to_an_attached_qemu_checks_its_keyboard(tmp_path: Path, args: list[str], keys: list[str], message: str | None) -> None:
    # No guest: a QEMU paused, or running firmware with nothing to boot.
    name = f"hand-{os.getpid()}-{time.monotonic_ns() % 100000}"
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(["qemu-system-x86_64", "-name", f"guest={name}", "-nodefaults", "-display", "none", "-m", "128", *args,
                             "-qmp", f"unix:{sock},server=on,wait=off"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sb("attach", str(proc.pid)).returncode == 0
        sent = sb("send-key", name, *keys)
        if message is None:
            assert sent.returncode == 0 and sent.stderr == b""
        else:
            err = sent.stderr.decode()
            assert sent.returncode == 125 and err.count("\n") == 1 and message.format(name=name) in err, err
    finally:
        proc.kill()
        proc.wait()
        run_tracked([*SANDBOX, "rm", "-f", name], timeout=30)
