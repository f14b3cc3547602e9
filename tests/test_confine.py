"""The walls around a real sandbox's QEMU, read from /proc while it runs."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SANDBOX, VISIBLE_BASE, PoolForTests, popen

pytestmark = [pytest.mark.vm]


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def find_qemu(launcher: int, timeout: float = 60) -> int:
    """The qemu-system process below the launcher (under its PID-namespace reaper)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        todo = children(launcher)
        while todo:
            pid = todo.pop()
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "qemu-system-x86":
                    return pid
            except OSError:
                continue
            todo += children(pid)
        time.sleep(0.05)
    raise AssertionError("no QEMU process appeared")


def _rss_by_mapping(pid: int) -> list[tuple[str, int]]:
    """(path, resident kB) for each file mapping of a process."""
    out: list[tuple[str, int]] = []
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and fields[0][0] in "0123456789abcdef" and ":" in fields[3]:
            name = " ".join(fields[5:])
        elif fields[0] == "Rss:" and name:
            out.append((name, int(fields[1])))
            name = ""
    return out


def _fd_flags(pid: int, fd: int) -> int:
    """The open flags of a process's descriptor."""
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError(f"no flags for fd {fd} of {pid}")


def status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


LIMITS = ("--pids-limit", "64", "--memory-limit", "1G", "--cpu-weight", "50")


@pytest.fixture(scope="module")
def limited_pool() -> Iterator[PoolForTests]:
    """A pool whose guests have the walls this module's runs ask for."""
    pool = PoolForTests(VISIBLE_BASE / f"confine-pool-{time.monotonic_ns()}")
    try:
        pool.start(*LIMITS)
        yield pool
    finally:
        problems = pool.close()
    assert not problems, problems


@pytest.mark.parametrize("boot", ["cold", "warm", "pooled"])
def test_qemu_is_confined_as_libvirt_would(boot: str, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> None:
    if os.geteuid() != 0:
        pytest.fail("confinement as root is what this checks")
    if boot == "warm":  # the template, built if this cache has none yet
        subprocess.run([*SANDBOX, "run", "--", "true"], check=True, capture_output=True, timeout=120)
    pool: PoolForTests | None = request.getfixturevalue("limited_pool") if boot == "pooled" else None
    waiting = {g["qemu_pid"] for g in pool.wait_ready()["ready"]} if pool is not None else set()
    proc = popen(
        [*SANDBOX, "run", "--timings=json", *(["--cold"] if boot == "cold" else []), *LIMITS,
         "--", "sh", "-c", "echo ready; read line; echo got $line"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=pool.env if pool is not None else None,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"ready\n"  # the guest runs: QEMU is fully set up
        if pool is not None:  # the guest the pool handed over: the one no longer waiting
            now = pool.status()
            assert now is not None
            (qemu,) = waiting - {g["qemu_pid"] for g in now["ready"]}
        else:
            qemu = find_qemu(proc.pid)
        st = status(qemu)
        evidence = {k: st[k] for k in ("Uid", "Gid", "Groups", "Seccomp", "NoNewPrivs")}
        # DAC: nobody/nogroup, no supplementary groups
        assert st["Uid"].split() == ["65534"] * 4 and st["Gid"].split() == ["65534"] * 4
        assert st["Groups"].strip() == ""
        # capabilities: only reading (the root's command may read all the root can), nothing to regain
        read_search = f"{1 << 2:016x}"
        assert [st[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")] == [read_search] * 4, st
        evidence["caps"] = f"CAP_DAC_READ_SEARCH only ({read_search})"
        # seccomp filter mode, no privilege gain
        assert st["Seccomp"].strip() == "2" and st["NoNewPrivs"].strip() == "1"
        # namespaces differ from the launcher's
        for ns in ("mnt", "pid", "ipc", "uts", "net"):
            ours, theirs = os.readlink(f"/proc/{proc.pid}/ns/{ns}"), os.readlink(f"/proc/{qemu}/ns/{ns}")
            assert ours != theirs, ns
            evidence[f"ns/{ns}"] = f"{theirs} (launcher {ours})"
        assert status(qemu)["NSpid"].split()[-1] == "1"  # PID 1 in its namespace
        # cgroup membership and limits
        groups = Path(f"/proc/{qemu}/cgroup").read_text()
        evidence["cgroup"] = " ".join(line for line in groups.splitlines() if "sandbox-" in line)
        limits = _limits(groups)
        assert limits.get("pids") == "64", groups
        assert limits.get("memory") == str(1 << 30), groups
        assert limits.get("cpu") in ("512", "50"), groups
        # hygiene: environment, working directory, descriptors
        env = Path(f"/proc/{qemu}/environ").read_bytes().split(b"\0")
        assert sorted(e.split(b"=")[0] for e in env if e) == [b"LC_ALL", b"PATH"]
        cwd = os.readlink(f"/proc/{qemu}/cwd")
        assert cwd.startswith(f"{pool.runtime}/sandbox/run-" if pool is not None else "/run/sandbox/run-"), cwd
        fds = {int(fd): os.readlink(f"/proc/{qemu}/fd/{fd}") for fd in os.listdir(f"/proc/{qemu}/fd")}
        assert fds[0] == "/dev/null" and fds[1].endswith("/qemu.log") and fds[2] == fds[1]
        images = sorted(t for t in fds.values() if t.startswith("/memfd:"))
        if boot == "cold":
            # The boot images: sealed in-memory copies (sandbox/backends/direct/bootimages.py),
            # the one file QEMU shares with the launcher, which empties them.
            assert [Path(t.split(" ")[0]).suffix for t in images] == [".cpio", ".pvh"], images
        else:
            # The template's RAM: a sealed memfd QEMU maps privately; the boot
            # images are the cache's own files, read-only, never written to RAM.
            # (twice: the descriptor it inherits and its own read-write reopening of it, for the mapping)
            assert {t.split(" ")[0].rsplit("-", 1)[0] for t in images} == {"/memfd:sandbox-ram"}, images
            assert len({os.stat(f"/proc/{qemu}/fd/{fd}").st_ino for fd, t in fds.items() if t in images}) == 1
            cached = sorted(Path(t).suffix for t in fds.values() if "/.cache/sandbox/" in t and "/templates/" not in t and "/files/" not in t)
            assert cached == [".cpio", ".pvh"], fds
            for fd, target in fds.items():
                if "/.cache/sandbox/" in target:
                    assert _fd_flags(qemu, fd) & os.O_ACCMODE == os.O_RDONLY, target
        # Besides: host trees' images the guest mounted (hostfiles.py), read-only through the read-only 9p root.
        assert {Path(t).suffix for t in fds.values() if "/.cache/sandbox/files/" in t} <= {".erofs", ".blob"}, fds
        for fd, target in fds.items():
            if "/.cache/sandbox/files/" in target:
                assert _fd_flags(qemu, fd) & os.O_ACCMODE == os.O_RDONLY, target
        for fd, target in fds.items():
            if target in images:
                with open(f"/proc/{qemu}/fd/{fd}", "rb") as f:
                    seals = fcntl.fcntl(f, fcntl.F_GET_SEALS)
                    if boot == "cold":  # emptied once used: the guest runs, so both were
                        assert os.fstat(f.fileno()).st_size == 0, target
                assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_GROW, (target, seals)
        if boot == "cold":
            mapped = _rss_by_mapping(qemu)
            assert [kb for name, kb in mapped if name.startswith("/memfd:")] == [0, 0], mapped
        # Nothing the launcher holds reaches QEMU: its pipes, its stdio, the
        # other ends of the socketpairs (each end is its own socket inode).
        launcher = {os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")}
        shared = {t for t in fds.values() if t in launcher} - {"/dev/null"} - set(images)
        if boot == "warm":  # the cache's kernel and initramfs, which both hold read-only
            shared = {t for t in shared if "/.cache/sandbox/" not in t}
        shared = {t for t in shared if not t.startswith(("anon_inode:", "/usr/", "/lib"))}
        assert shared == set(), shared
        evidence["fds"] = f"{len(fds)} (0: /dev/null, 1-2: qemu.log, images: sealed memfds {', '.join(t.split(' ')[0] for t in images)})"
        assert sum(t.startswith("socket:") for t in fds.values()) >= 6  # console, monitor, 4 ports
    finally:
        proc.stdin.write(b"bye\n")
        proc.stdin.close()
        out = proc.stdout.read()
        proc.wait(60)
    assert out == b"got bye\n"
    assert proc.returncode == 0
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert json.loads(err[err.index("{\n") :])["start"] == boot  # the walls held for the start asked for
    # The audit trail has this sandbox's start and stop.
    # (Other sandboxes on the machine write to the same trail meanwhile: this one's are found by its QEMU.)
    audit = subprocess.run([*SANDBOX, "audit", "-n", "200"], capture_output=True, text=True, check=True).stdout
    records = [r for r in map(json.loads, audit.splitlines()) if r.get("qemu_pid") == qemu]
    if pool is not None:  # made before any run asked (start), handed to this one (serve)
        start, serve, stop = records
        assert serve["event"] == "serve" and serve["launcher_pid"] == proc.pid and serve["run"] == start["run"]
        assert start["command"]["argv"] == ["(pool guest, waiting)"]
        command = serve["command"]
    else:
        start, stop = records
        command = start["command"]
    assert start["event"] == "start" and stop["event"] == "stop"
    assert start["qemu_pid"] == qemu == stop["qemu_pid"] and start["qemu_uid"] == 65534
    assert command["argv"][:2] == ["sh", "-c"] and start["shares"] == ["/ (read-only)"]
    assert "command" not in stop and stop["run"] == start["run"]  # the argv is logged once
    assert stop["exit_status"] == 0 and stop["duration_s"] > 0 and "user" in start and "label" in start
    with capsys.disabled():
        print("\nconfinement evidence:\n  " + "\n  ".join(f"{k}: {v}" for k, v in evidence.items()))


def _limits(cgroup_file: str) -> dict[str, str]:
    """Limits of the sandbox's cgroups, v1 or v2."""
    out = {}
    for line in cgroup_file.splitlines():
        _, controllers, path = line.split(":", 2)
        if "sandbox-" not in path:
            continue
        if controllers == "":
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            out["pids"] = (base / "pids.max").read_text().strip()
            out["memory"] = (base / "memory.max").read_text().strip()
            out["cpu"] = (base / "cpu.weight").read_text().strip()
        for c in controllers.split(","):
            base = Path("/sys/fs/cgroup") / c / path.lstrip("/")
            if c == "pids":
                out["pids"] = (base / "pids.max").read_text().strip()
            elif c == "memory":
                out["memory"] = (base / "memory.limit_in_bytes").read_text().strip()
            elif c == "cpu":
                out["cpu"] = (base / "cpu.shares").read_text().strip()
    return out
