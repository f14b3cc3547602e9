"""Shared fixtures: a way to run the real CLI, and checks that nothing is left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SANDBOX = [sys.executable, "-m", "sandbox"]
# Host directories the guest can see (not under its private /tmp or /home).
VISIBLE_BASE = Path("/var/lib/sandbox-tests")


def qemu_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "qemu-system-x86"], capture_output=True, text=True, check=False).stdout
    return {int(p) for p in out.split()}


def run_sandbox(
    *args: str,
    input: bytes | None = None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    run_opts: tuple[str, ...] = (),
    **kw: object,
) -> subprocess.CompletedProcess[bytes]:
    """`sandbox run [run_opts] -- args...`, as a user would type it."""
    return subprocess.run(
        [*SANDBOX, "run", *run_opts, "--", *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        check=False,
        **kw,  # type: ignore[arg-type]
    )


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


def stderr_lines(proc: subprocess.CompletedProcess[bytes]) -> list[str]:
    """The launcher's stderr without the expected TCG warning."""
    return [ln for ln in proc.stderr.decode().splitlines() if "KVM unavailable" not in ln]


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """Fails the test if it leaves a QEMU process or a runtime dir behind."""
    before = qemu_pids()
    base = Path("/run/sandbox") if os.geteuid() == 0 else None
    dirs_before = set(base.iterdir()) if base and base.exists() else set()
    yield
    assert qemu_pids() - before == set(), "a QEMU process outlived its sandbox"
    if base and base.exists():
        assert set(base.iterdir()) - dirs_before == set(), "a runtime dir was left behind"


@pytest.fixture(scope="session", autouse=True)
def session_leftovers() -> Iterator[None]:
    """After the whole suite: no QEMU process and no runtime dir of ours remains."""
    before = qemu_pids()
    yield
    left = qemu_pids() - before
    assert not left, f"QEMU processes left after the suite: {left}"
    base = Path("/run/sandbox")
    if base.exists():
        stale = [p for p in base.iterdir() if p.name.startswith("run-")]
        assert not stale, f"runtime dirs left after the suite: {stale}"
    if VISIBLE_BASE.exists():
        VISIBLE_BASE.rmdir()  # fails (and so reports) if a test left something in it
