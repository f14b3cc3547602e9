"""--connect end to end, against a libvirtd the tests start (tools/libvirtd.py --private).

Three transports to one daemon: its UNIX socket (the qemu:///system driver,
a local host: the cached images are uploaded; open to root and to the
`nogroup` group, for the non-root tests), TCP on 127.0.0.1, and ssh through
a private sshd in the daemon's mount namespace (tools/sshd.py): both remote
hosts to the launcher, which finds and mirrors that host's own kernel
through libvirt, assuming no shared path.  Most tests run the launcher
from a directory libvirt's QEMU user can read; the home-directory tests
run it from 0700 homes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, SANDBOX, Nobody, popen, run_tracked, stderr_lines

pytestmark = pytest.mark.vm


@dataclass
class Libvirtd:
    work: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def local(self) -> str:
        return f"qemu+unix:///system?socket={self.work}/run/libvirt-sock"

    @property
    def remote(self) -> str:
        return f"qemu+tcp://127.0.0.1:{self.port}/system"

    def domains(self) -> list[str]:
        import libvirt

        conn = libvirt.open(self.local)
        try:
            return [d.name() for d in conn.listAllDomains()]
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.work, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_libvirtd(*extra: str) -> Libvirtd:
    for tool in ("libvirtd", "virtlogd", "unshare"):
        if shutil.which(tool) is None:
            pytest.fail(f"the libvirt tests need {tool} (setup.sh installs libvirt-daemon-system)")
    work = Path(tempfile.mkdtemp(prefix="sandbox-libvirtd-"))
    port = _free_port()
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", sys.executable, str(REPO / "tools" / "libvirtd.py"), "--private", str(work), str(port), *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    daemon = Libvirtd(work, port, proc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (work / "run" / "libvirt-sock").exists():
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return daemon
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    log = (work / "daemons.log").read_text(errors="replace")[-2000:] if (work / "daemons.log").exists() else ""
    daemon.stop()
    pytest.fail(f"libvirtd did not come up: {log}")


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    daemon = start_libvirtd("--socket-group", "nogroup")
    daemon.work.chmod(0o711)  # nobody reaches the socket (the group's), lists nothing
    try:
        yield daemon
    finally:
        daemon.stop()


@dataclass
class Sshd:
    work: Path
    uri: str  # qemu+ssh://root@127.0.0.1:PORT/system?keyfile=...&command=... (the daemon's qemu:///system)
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def sshd(libvirtd: Libvirtd) -> Iterator[Sshd]:
    """A key-only sshd on 127.0.0.1 whose sessions reach the private libvirtd (tools/sshd.py)."""
    if shutil.which("sshd", path="/usr/sbin:/usr/bin") is None:
        pytest.fail("the qemu+ssh tests need sshd (setup.sh installs openssh-server)")
    work = Path(tempfile.mkdtemp(prefix="sandbox-sshd-"))
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "sshd.py"), str(work), str(port), "--mount-ns-of", str(libvirtd.proc.pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().decode().strip()
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        if not uri or proc.poll() is not None:
            log = (work / "sshd.log").read_text(errors="replace") if (work / "sshd.log").exists() else ""
            pytest.fail(f"sshd did not come up: {log}")
        yield Sshd(work, uri, proc)
    finally:
        proc.terminate()
        proc.wait(20)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_domain_left(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "libvirtd" in request.fixturenames:
        daemon = request.getfixturevalue("libvirtd")
        assert daemon.domains() == [], "a domain outlived its sandbox"


@pytest.fixture(scope="module")
def where() -> Iterator[tuple[Path, dict[str, str]]]:
    """A working directory and home that libvirt's QEMU user can read."""
    base = Path(tempfile.mkdtemp(prefix="sandbox-lv-user-"))
    base.chmod(0o755)
    (base / "home").mkdir(mode=0o755)
    env = dict(os.environ, HOME=str(base / "home"), XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")))
    env.pop("SANDBOX_CONNECT", None)
    try:
        yield base, env
    finally:
        shutil.rmtree(base, ignore_errors=True)


def lv_run(where: tuple[Path, dict[str, str]], uri: str, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    cwd, env = where
    return run_tracked([*SANDBOX, "run", "--connect", uri, *args], input=input, env=env, cwd=cwd, timeout=240)


STREAMS = "cat; echo to-stderr >&2; touch /usr/sandbox-x 2>/dev/null && echo writable >&2 || echo read-only >&2; exit 7"


def _check_streams(proc: subprocess.CompletedProcess[bytes], data: bytes) -> None:
    assert proc.returncode == 7, proc.stderr.decode(errors="replace")
    assert hashlib.sha256(proc.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    assert proc.stderr.decode().splitlines()[:2] == ["to-stderr", "read-only"]


def test_local_statuses_streams_and_a_read_only_root(libvirtd: Libvirtd, where: tuple[Path, dict[str, str]]) -> None:
    data = os.urandom(1 << 20) + bytes(range(256)) * 64
    _check_streams(lv_run(where, libvirtd.local, "--", "sh", "-c", STREAMS, input=data), data)
    assert lv_run(where, libvirtd.local, "--", "sh", "-c", "kill -TERM $$").returncode == 128 + 15
    # Empty stdin is an immediate EOF, not a hang.
    assert lv_run(where, libvirtd.local, "--", "wc", "-c", input=b"").stdout.strip() == b"0"


def test_through_qemu_system_as_users_write_it(where: tuple[Path, dict[str, str]]) -> None:
    """The host's own libvirtd (setup.sh starts it), by its plain URI."""
    with socket.socket(socket.AF_UNIX) as probe:
        if probe.connect_ex("/run/libvirt/libvirt-sock") != 0:
            pytest.fail("no libvirtd answers on this host: setup.sh starts one (tools/libvirtd.py --ensure)")
    data = os.urandom(200_000)
    _check_streams(lv_run(where, "qemu:///system", "--", "sh", "-c", STREAMS, input=data), data)


def test_prepare_puts_the_images_on_the_host_ahead_of_the_first_run(libvirtd: Libvirtd, where: tuple[Path, dict[str, str]]) -> None:
    cwd, env = where
    proc = run_tracked([*SANDBOX, "prepare", "--connect", libvirtd.remote], env=env, cwd=cwd, timeout=240)
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert "(remote host, its own kernel)" in out and "/var/lib/libvirt/images/sandbox/" in out
    # They are volumes of the host's `sandbox` pool, as libvirt sees them.
    import libvirt

    conn = libvirt.open(libvirtd.local)
    try:
        names = {v.name() for v in conn.storagePoolLookupByName("sandbox").listAllVolumes()}
    finally:
        conn.close()
    assert any(n.startswith("initramfs-") and not n.endswith(".complete") for n in names)
    assert any(n.endswith(".complete") for n in names)


def test_remote_transport_uses_the_hosts_own_kernel_and_times_itself(libvirtd: Libvirtd, where: tuple[Path, dict[str, str]]) -> None:
    data = os.urandom(300_000)
    proc = lv_run(where, libvirtd.remote, "--timings=json", "--", "sh", "-c", STREAMS, input=data)
    _check_streams(proc, data)
    timing = json.loads(proc.stderr[proc.stderr.index(b"{") :])
    assert timing["start"] == "cold, libvirt"
    assert {"kernel", "command", "total"} <= set(timing["spans_ms"])
    mirrors = list((Path(where[1]["XDG_CACHE_HOME"]) / "sandbox" / "remote").glob("*/boot/vmlinuz-*"))
    assert mirrors, "the remote host's kernel was not fetched through libvirt"
    # The domain's UUID is in the audit trail.
    audit = [json.loads(l) for l in run_tracked([*SANDBOX, "audit", "-n", "4"], env=where[1]).stdout.decode().splitlines()]
    assert any(e.get("backend") == "libvirt" and e.get("domain_uuid") and e.get("uri") == libvirtd.remote for e in audit)


def test_timeout_and_a_forwarded_ctrl_c(libvirtd: Libvirtd, where: tuple[Path, dict[str, str]]) -> None:
    proc = lv_run(where, libvirtd.remote, "--timeout", "8", "--", "sleep", "100")
    assert proc.returncode == 124 and b"timed out" in proc.stderr
    cwd, env = where
    p = popen([*SANDBOX, "run", "--connect", libvirtd.remote, "--", "sh", "-c", "echo ready; exec sleep 100"],
              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    p.send_signal(signal.SIGINT)
    assert p.wait(60) == 128 + signal.SIGINT


def test_info_names_the_domain_and_its_label(libvirtd: Libvirtd, where: tuple[Path, dict[str, str]]) -> None:
    cwd, env = where
    name = f"lv-info-{os.getpid()}"
    p = popen([*SANDBOX, "run", "--connect", libvirtd.local, "--name", name, "--", "sh", "-c", "echo ready; exec sleep 100"],
              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)  # fmt: skip
    try:
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        info = json.loads(run_tracked([*SANDBOX, "info", "--json", name], env=env, cwd=cwd).stdout)
        assert info["state"] == "running" and info["start"] == "cold, libvirt"
        # The domain libvirtd runs, and the label its security driver gave it (DAC here: no SELinux).
        assert info["machine"] in [f"libvirt domain {d}" for d in libvirtd.domains()], info
        # Root's QEMU runs as libvirt's own user where that user can read what the guest overlays.
        assert info["label"] == f"dac {libvirt_user(libvirtd)}", info
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(60)
        run_tracked([*SANDBOX, "rm", "-f", name], env=env, cwd=cwd)


def test_a_killed_launcher_leaves_no_domain(libvirtd: Libvirtd, where: tuple[Path, dict[str, str]]) -> None:
    cwd, env = where
    p = popen([*SANDBOX, "run", "--connect", libvirtd.remote, "--", "sh", "-c", "echo ready; exec sleep 100"],
              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=cwd)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    assert len(libvirtd.domains()) == 1
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 20
    while libvirtd.domains() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert libvirtd.domains() == []  # AUTODESTROY: gone with the connection
    # Its runtime dir is the next run's to reclaim (as with the direct backend).
    assert lv_run(where, libvirtd.local, "--", "true").returncode == 0
    assert not list(Path("/run/sandbox").glob(f"run-{p.pid}-*"))


def libvirt_user(daemon: Libvirtd) -> str:
    """The DAC label libvirt gives QEMU by default (+UID:+GID), from its capabilities."""
    import libvirt

    conn = libvirt.open(daemon.local)
    try:
        label = ET.fromstring(conn.getCapabilities()).findtext("host/secmodel[model='dac']/baselabel[@type='qemu']")
    finally:
        conn.close()
    assert label and label != "+0:+0", label
    return label


def _info(name: str, env: dict[str, str], cwd: Path | str, as_user: Nobody | None = None) -> dict[str, Any]:
    if as_user is not None:
        proc = as_user.run("info", "--json", name, env=env, cwd=cwd)
        as_user.run("rm", name, env=env, cwd=cwd)
    else:
        proc = run_tracked([*SANDBOX, "info", "--json", name], env=env, cwd=cwd)
        run_tracked([*SANDBOX, "rm", name], env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


HOME_SCRIPT = 'pwd; echo "$PWD"; stat -c "%U %a" .; echo to-stderr >&2; exit 5'


@pytest.mark.parametrize("which", ["private", "qemu:///system"])
def test_root_runs_from_its_own_0700_home(libvirtd: Libvirtd, which: str) -> None:
    """Issue 21 item 6: `mount overlay on /newroot/root: Permission denied` from /root."""
    if os.geteuid() != 0 or Path("/root").stat().st_mode & 0o077:
        pytest.fail("this test runs as root, whose /root is 0700 (Debian's)")
    uri = libvirtd.local if which == "private" else "qemu:///system"
    env = {k: v for k, v in os.environ.items() if k not in ("SANDBOX_CONNECT", "PWD")} | {"HOME": "/root"}
    name = f"lv-root-{os.getpid()}-{which[:4]}"
    proc = run_tracked([*SANDBOX, "run", "--connect", uri, "--name", name, "--", "sh", "-c", HOME_SCRIPT], env=env, cwd="/root", timeout=240)
    assert proc.returncode == 5, proc.stderr.decode(errors="replace")
    assert proc.stdout.decode().splitlines() == ["/root", "/root", "root 700"]
    assert stderr_lines(proc) == ["to-stderr"]
    # libvirt's own user cannot read /root: this QEMU ran as root (see libvirt/dac.py).
    assert _info(name, env, "/root")["label"] == "dac +0:+0"


def test_a_normal_user_runs_git_from_their_0700_home(libvirtd: Libvirtd, nobody: Nobody) -> None:
    """QEMU runs as the user: the guest reads a 0700 home, and shows real owners (git refuses a repository that is not yours)."""
    repo = nobody.home / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "README").write_text("hello\n")
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    subprocess.run(["chown", "-R", "nobody:nogroup", str(repo)], check=True)
    assert nobody.home.stat().st_mode & 0o777 == 0o700
    env = nobody.env()
    name = f"lv-user-{os.getpid()}"
    script = 'pwd; id -u; stat -c "%U %a" "$HOME"; git log --format=%s; git status --porcelain; echo to-stderr >&2'
    proc = nobody.run("run", "--connect", libvirtd.local, "--name", name, "--", "sh", "-c", script, env=env, cwd=repo)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout.decode().splitlines() == [str(repo), "65534", "nobody 700", "first"]
    assert stderr_lines(proc) == ["to-stderr"]
    assert _info(name, env, repo, as_user=nobody)["label"] == "dac +65534:+65534"


def test_qemu_ssh_from_roots_home_starts_in_an_empty_home_of_its_own(libvirtd: Libvirtd, sshd: Sshd) -> None:
    """A remote host: nothing of ours is there, whatever our working directory; the command starts in its private home."""
    env = {k: v for k, v in os.environ.items() if k not in ("SANDBOX_CONNECT", "PWD")} | {"HOME": "/root"}
    script = 'pwd; echo "$PWD"; stat -c "%U %a" .; ls -A | wc -l; touch mine && echo wrote; echo to-stderr >&2; exit 3'
    proc = run_tracked([*SANDBOX, "run", "--connect", sshd.uri, "--", "sh", "-c", script], env=env, cwd="/root", timeout=240)
    assert proc.returncode == 3, proc.stderr.decode(errors="replace")
    assert proc.stdout.decode().splitlines() == ["/root", "/root", "root 700", "0", "wrote"]
    assert stderr_lines(proc) == ["to-stderr"]
    assert not Path("/root/mine").exists()
    # --workdir: a directory of that host's, copy-on-write; launched from a directory that no longer exists here.
    gone = Path(tempfile.mkdtemp(prefix="sandbox-gone-"))
    run = [*SANDBOX, "run", "--connect", sshd.uri, "--workdir", "/var/log", "--", "sh", "-c", 'pwd; echo "$PWD"; touch mine && echo wrote']
    proc = run_tracked(["sh", "-c", 'cd "$0" && rmdir "$0" && exec "$@"', str(gone), *run], env=env, cwd="/root", timeout=240)
    assert not gone.exists()
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout.decode().splitlines() == ["/var/log", "/var/log", "wrote"]
    assert stderr_lines(proc) == [] and not Path("/var/log/mine").exists()


def _one_line(proc: subprocess.CompletedProcess[bytes], expect: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == 125, err
    assert expect in err and len(err.strip().splitlines()) == 1, err


def test_errors_are_one_line(libvirtd: Libvirtd, where: tuple[Path, dict[str, str]]) -> None:
    _one_line(lv_run(where, f"qemu+tcp://127.0.0.1:{_free_port()}/system", "--", "true"), "cannot reach libvirtd")
    _one_line(lv_run(where, "nonsense", "--", "true"), "--connect nonsense: not a libvirt URI")
    _one_line(lv_run(where, libvirtd.local, "--cpu-model", "no-such-cpu", "--", "true"), "libvirt refused the domain:")
    _one_line(lv_run(where, libvirtd.local, "--net", "user", "--", "true"), "--net with --connect: not supported yet")


def test_a_remote_host_without_a_kernel_and_one_that_refuses_us(where: tuple[Path, dict[str, str]]) -> None:
    daemon = start_libvirtd("--empty-boot")
    try:
        _one_line(lv_run(where, daemon.remote, "--", "true"), "has no usable kernel in /boot")
        assert daemon.domains() == []
    finally:
        daemon.stop()
    daemon = start_libvirtd("--auth-sasl")
    try:
        _one_line(lv_run(where, daemon.remote, "--", "true"), f"--connect {daemon.remote}: authentication refused (authentication failed)")
    finally:
        daemon.stop()
