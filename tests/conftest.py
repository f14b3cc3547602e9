"""Shared fixtures: a way to run the real CLI, and checks that nothing is left behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SANDBOX = [sys.executable, "-m", "sandbox"]
# No test meets a pool it did not start (the user's own, or one a run
# would start for the next runs): the pool's tests start theirs, in a
# runtime dir of their own (PoolForTests).
os.environ["SANDBOX_POOL"] = "0"
# Host directories for tests that need a path outside /tmp and the home
# (each run of the suite its own, so that two runs never meet).
VISIBLE_BASE = Path("/var/lib/sandbox-tests") / f"session-{os.getpid()}"

# Every launcher a test starts, in order: fixtures check and clean up
# exactly these (their QEMUs and runtime dirs), never anyone else's.
STARTED: list[int] = []


def popen(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Start a launcher (the whole command line, wrappers included) and track it.

    An environment of the test's own still says whether there is a pool
    (SANDBOX_POOL, and under start_mode's pooled runs where it is): no
    run a test starts leaves a pool of its own behind.
    """
    env = kw.get("env")
    if env is not None and "SANDBOX_POOL" not in env:
        pooled = os.environ.get("SANDBOX_POOL", "0") != "0"
        kw["env"] = {**env, "SANDBOX_POOL": os.environ.get("SANDBOX_POOL", "0"),
                     **({"XDG_RUNTIME_DIR": os.environ["XDG_RUNTIME_DIR"]} if pooled and "XDG_RUNTIME_DIR" not in env else {})}  # fmt: skip
    # A suite started as a background job of a shell without job control
    # (`cmd &` in a script) inherits SIGINT and SIGQUIT ignored, and a
    # launcher keeps what it was started ignoring (as the command would):
    # each launcher starts as a user's foreground command does.
    setup = kw.pop("preexec_fn", None)

    def preexec() -> None:
        for signo in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(signo, signal.SIG_DFL)
        if setup is not None:
            setup()

    proc: subprocess.Popen[bytes] = subprocess.Popen(argv, preexec_fn=preexec, **kw)
    STARTED.append(proc.pid)
    return proc


def run_tracked(argv: list[str], input: bytes | None = None, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    """subprocess.run for a launcher, tracked; killed if it outlives `timeout`."""
    if input is not None:
        kw["stdin"] = subprocess.PIPE
    proc = popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    try:
        out, err = proc.communicate(input, timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


# For each stdio fd, a script whose output shows how it met that fd closed.
CLOSED_FD_SCRIPTS = {
    0: "cat; echo rc=$?",
    1: "echo to-stdout; echo rc=$? >&2",
    2: "echo to-stderr >&2; echo rc=$?",
}


def run_with_fd_closed(argv: list[str], fd: int, timeout: float = 120) -> tuple[bytes | None, bytes | None, int]:
    """(stdout, stderr, status) of `argv` started with `fd` closed (the other two piped; stdin /dev/null), tracked."""
    streams: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    streams[("stdin", "stdout", "stderr")[fd]] = subprocess.DEVNULL
    proc = popen(argv, **streams, preexec_fn=lambda: os.close(fd))
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        proc.wait()
    return out, err, proc.returncode


def run_sandbox(
    *args: str,
    input: bytes | None = None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    run_opts: tuple[str, ...] = (),
    **kw: Any,
) -> subprocess.CompletedProcess[bytes]:
    """`sandbox run [run_opts] -- args...`, as a user would type it."""
    return run_tracked([*SANDBOX, "run", *run_opts, "--", *args], input=input, timeout=timeout, env=env, cwd=cwd, **kw)


def _qemus_of(launchers: set[int]) -> dict[int, int]:
    """QEMU pid -> launcher pid, for QEMUs whose runtime dir (their cwd) is one of these launchers'."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "qemu-system-x86":
                continue
            name = Path(os.readlink(entry / "cwd").removesuffix(" (deleted)")).name
        except OSError:
            continue
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == "run" and parts[1].isdigit() and int(parts[1]) in launchers:
            found[int(entry.name)] = int(parts[1])
    return found


def _runtime_dirs_of(launchers: set[int]) -> list[Path]:
    bases = [Path("/run/sandbox"), *Path(tempfile.gettempdir()).glob("sandbox-*"), *(p.runtime / "sandbox" for p in POOLS)]
    return [d for base in bases for pid in launchers for d in base.glob(f"run-{pid}-*")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours that nobody waited for is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def clean_up(launchers: set[int]) -> list[str]:
    """Kill and remove whatever these launchers left; say what that was."""
    problems = []
    for pid in sorted(launchers):
        if _alive(pid):
            problems.append(f"launcher {pid} still running")
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _qemus_of(launchers) and time.monotonic() < deadline:
        time.sleep(0.1)  # QEMU dies with its launcher (parent-death signal)
    for qemu, launcher in _qemus_of(launchers).items():
        problems.append(f"QEMU {qemu} of launcher {launcher} outlived it")
        os.kill(qemu, signal.SIGKILL)
    for d in _runtime_dirs_of(launchers):
        problems.append(f"runtime dir {d} left behind")
        shutil.rmtree(d, ignore_errors=True)
    return problems


@pytest.fixture(autouse=True)
def own_sandboxes() -> Iterator[None]:
    """Fails the test if a sandbox it started leaves a launcher, QEMU or runtime dir behind."""
    first = len(STARTED)
    yield
    problems = clean_up(set(STARTED[first:]))
    if problems:
        pytest.fail("; ".join(problems))


def run_guest_python(
    script: Path, *args: str, files: tuple[Path, ...] = (), run_opts: tuple[str, ...] = (), timeout: float = 300
) -> subprocess.CompletedProcess[bytes]:
    """Run `script` with Debian's python3 in a sandbox, as root, with this repository's package importable.

    The repository may sit under /root or /tmp, which are private in the
    guest: the script, the package and `files` travel in a --home share.
    """
    python = Path("/usr/bin/python3")
    if not python.exists():
        pytest.fail("Debian's python3 is needed in the guest (./setup.sh installs it)")
    share = VISIBLE_BASE / f"{script.stem}-{os.getpid()}"
    share.mkdir(parents=True)
    try:
        for f in (script, *files):
            shutil.copy(f, share)
        shutil.copytree(REPO / "sandbox", share / "sandbox", ignore=shutil.ignore_patterns("__pycache__"))
        return run_sandbox(
            str(python), script.name, *args,
            run_opts=("--qemu-user", "root", "--home", str(share), *run_opts),
            cwd=share, timeout=timeout, env=dict(os.environ, PYTHONPATH="."),
        )  # fmt: skip
    finally:
        shutil.rmtree(share, ignore_errors=True)


def read_pty(master: int, timeout: float) -> bytes:
    """Everything written to a pty until its last slave holder is gone (or `timeout`); closes `master`."""
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every holder of the slave is gone
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    return out


def stderr_lines(proc: subprocess.CompletedProcess[bytes]) -> list[str]:
    """The launcher's stderr without the expected TCG warning."""
    return [ln for ln in proc.stderr.decode().splitlines() if "KVM unavailable" not in ln]


@pytest.fixture(scope="session", autouse=True)
def session_leftovers() -> Iterator[None]:
    """After the whole suite: nothing any of its sandboxes started remains."""
    yield
    problems = clean_up(set(STARTED))
    assert not problems, problems
    shutil.rmtree(COLD_CONFIG, ignore_errors=True)
    if VISIBLE_BASE.exists():
        VISIBLE_BASE.rmdir()  # fails (and so reports) if a test left something in it
    try:
        VISIBLE_BASE.parent.rmdir()
    except OSError:
        pass  # another run's session is still there


def _unreadable_for_others(path: Path) -> bool:
    return any(not parent.stat().st_mode & 0o001 for parent in path.parents)


class Nobody:
    """Runs the launcher as the `nobody` user, with caches of its own (shared by the session)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.home = Path(f"/home/sandbox-test-{os.getpid()}")
        for d in (base, base / "state", base / "run", self.home):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.chown(d, "nobody", "nogroup")
        self.prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        real_python = Path(os.path.realpath(SANDBOX[0]))
        if _unreadable_for_others(Path(__file__)) or _unreadable_for_others(real_python) or not os.access(SANDBOX[0], os.X_OK):
            # The checkout, or the interpreter its venv links to (pyenv's),
            # sits where others cannot enter (e.g. /root): let the launcher
            # read it, without any other privilege.
            self.prefix += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]

    # Under start_mode's pooled runs: the environment that meets nobody's own pool.
    pool_env: dict[str, str] = {}

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "PATH": os.environ["PATH"], "HOME": str(self.home), "USER": "nobody", "XDG_CACHE_HOME": str(self.base),
            "XDG_STATE_HOME": str(self.base / "state"), "XDG_RUNTIME_DIR": str(self.base / "run"), "SANDBOX_POOL": "0",
            **self.pool_env,
        }  # fmt: skip
        env.update(extra)
        return {k: v for k, v in env.items() if v}

    def run(self, *args: str, env: dict[str, str] | None = None, cwd: str | Path = "/", **kw: Any) -> subprocess.CompletedProcess[bytes]:
        """`sandbox ARGS...` as nobody."""
        return run_tracked([*self.prefix, *SANDBOX, *args], env=env or self.env(), cwd=cwd, timeout=240, **kw)

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(scope="session")
def nobody() -> Iterator[Nobody]:
    if os.geteuid() != 0:
        pytest.fail("the non-root tests switch to the nobody user and must start as root")
    user = Nobody(VISIBLE_BASE / "nobody")
    try:
        yield user
    finally:
        user.close()


# ---- the pool (sandbox/backends/pool/) ------------------------------------------

POOLS: list[PoolForTests] = []  # the pools tests started, for the leftover checks


class PoolForTests:
    """A pool of a test's own, in a runtime dir of its own (XDG_RUNTIME_DIR): `env` runs meet it; `stop` checks what it leaves."""

    def __init__(self, runtime: Path, size: int = 2, user: Nobody | None = None) -> None:
        self.runtime, self.size, self.user = runtime, size, user
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        if user is not None:
            shutil.chown(runtime, "nobody", "nogroup")
            self.env = {**user.env(), "XDG_RUNTIME_DIR": str(runtime), "SANDBOX_POOL": str(size)}
        else:
            self.env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), SANDBOX_POOL=str(size))
        self.pid = 0
        POOLS.append(self)

    def sandbox(self, *args: str, timeout: float = 240, **kw: Any) -> subprocess.CompletedProcess[bytes]:
        """`sandbox ARGS...` with this pool's environment (as its user)."""
        prefix = self.user.prefix if self.user is not None else []
        kw.setdefault("env", self.env)
        kw.setdefault("cwd", "/" if self.user is not None else None)
        return run_tracked([*prefix, *SANDBOX, *args], timeout=timeout, **kw)

    def start(self, *options: str) -> dict[str, Any]:
        proc = self.sandbox("pool", "start", "--size", str(self.size), "--idle", "3600", *options, timeout=600)
        assert proc.returncode == 0, proc.stderr.decode()
        status = self.wait_ready()
        self.pid = int(status["pid"])
        return status

    def status(self) -> dict[str, Any] | None:
        proc = self.sandbox("pool", "status", "--json")
        assert proc.returncode == 0, proc.stderr.decode()
        found: dict[str, Any] = json.loads(proc.stdout)
        return found if found.get("ok") else None

    def wait_ready(self, guests: int | None = None, timeout: float = 240) -> dict[str, Any]:
        """The status once `guests` (default: all) are ready and a launcher is."""
        want = self.size if guests is None else guests
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            assert status is not None, "the pool is not running"
            if len(status["ready"]) >= want and status["launchers_ready"] >= 1:
                return status
            assert time.monotonic() < deadline, f"the pool was not ready in {timeout:g} s: {status}"
            time.sleep(0.2)

    def processes(self) -> list[int]:
        """Every process of this pool: itself, its launchers (its environment) and its QEMUs (their runtime dirs)."""
        found = []
        marker = f"XDG_RUNTIME_DIR={self.runtime}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0") or os.readlink(entry / "cwd").startswith(str(self.runtime) + "/"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return [p for p in found if _alive(p)]

    def stop(self) -> list[str]:
        """Stop it; what it left behind (then removed)."""
        problems = []
        proc = self.sandbox("pool", "stop")
        if proc.returncode != 0:
            problems.append(f"pool stop: {proc.stderr.decode().strip()}")
        deadline = time.monotonic() + 20
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.processes():
            problems.append(f"process {pid} ({Path(f'/proc/{pid}/comm').read_text().strip()}) of the pool outlived it")
            os.kill(pid, signal.SIGKILL)
        base = self.runtime / "sandbox"
        left = [p.name for p in base.iterdir() if p.name.startswith("run-") or p.name == "pool.sock"] if base.exists() else []
        if left:
            problems.append(f"left in {base}: {left}")
        return problems

    def close(self) -> list[str]:
        problems = self.stop()
        shutil.rmtree(self.runtime, ignore_errors=True)
        POOLS.remove(self)
        return problems


@contextlib.contextmanager
def running_pool(name: str, user: Nobody | None = None, size: int = 2) -> Iterator[PoolForTests]:
    """A started pool in a runtime dir of its own, closed after (the close must find nothing left behind)."""
    pool = PoolForTests(VISIBLE_BASE / f"{name}-{os.getpid()}-{time.monotonic_ns()}", size=size, user=user)
    try:
        pool.start()
        yield pool
    finally:
        problems = pool.close()
    assert not problems, problems


@pytest.fixture(scope="module")
def test_pool() -> Iterator[PoolForTests]:
    """A pool of two guests made for the default options, for one test module's pooled runs."""
    with running_pool("pool") as pool:
        yield pool


@pytest.fixture(scope="module")
def nobody_pool(nobody: Nobody) -> Iterator[PoolForTests]:
    """nobody's own pool, for one test module's pooled runs as nobody."""
    with running_pool("nobody-pool", user=nobody) as pool:
        yield pool


# What each start mode puts in the environment of the runs a test starts.
COLD_CONFIG = VISIBLE_BASE / "cold-config"


@pytest.fixture(params=["pooled", "warm", "cold"])
def start_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Runs the test's sandboxes pooled, warm or cold (every run test, in all three: issue 23).

    Pooled: its runs meet a pool of the module's (their environment names
    it); the test fails if none of them went through it, unless it is
    marked `unpooled` with the reason.  Cold: a config file says --cold.
    """
    mode: str = request.param
    before = None
    pool: PoolForTests | None = None
    if mode == "pooled":
        if "nobody" in request.fixturenames:
            pool = request.getfixturevalue("nobody_pool")
            monkeypatch.setattr(Nobody, "pool_env", {k: pool.env[k] for k in ("XDG_RUNTIME_DIR", "SANDBOX_POOL")})
        else:
            pool = request.getfixturevalue("test_pool")
            for k in ("XDG_RUNTIME_DIR", "SANDBOX_POOL"):
                monkeypatch.setenv(k, pool.env[k])
        status = pool.wait_ready(1)
        before = status["served"] + status["launches"]
    elif mode == "cold":
        (COLD_CONFIG / "sandbox").mkdir(parents=True, exist_ok=True)
        (COLD_CONFIG / "sandbox" / "config.toml").write_text("cold = true\n")
        monkeypatch.setenv("XDG_CONFIG_HOME", str(COLD_CONFIG))
    first = len(STARTED)
    yield mode
    if pool is not None and len(STARTED) > first and request.node.get_closest_marker("unpooled") is None:
        status = pool.status()
        assert status is not None, "the pool ended"
        assert status["served"] + status["launches"] > (before or 0), "none of the test's runs went through the pool"
