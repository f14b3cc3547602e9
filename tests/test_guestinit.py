"""Building the guest init and the TSC probe with the user's compiler."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import REPO, SANDBOX, run_tracked
from sandbox import guestinit


def test_the_sources_compile_without_a_warning(tmp_path: Path) -> None:
    # The project's own warning gate: users build without -Werror, so that a
    # newer gcc's new warning cannot break their first run.
    for source, flags in ((REPO / "guest-init" / "init.c", guestinit.INIT_CFLAGS), (REPO / "sandbox" / "tsc_khz.c", guestinit.TSC_CFLAGS)):
        proc = subprocess.run(["cc", *flags, "-Werror", "-o", str(tmp_path / source.stem), str(source)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr


def test_a_warning_does_not_fail_the_users_build(tmp_path: Path) -> None:
    source = tmp_path / "warns.c"
    source.write_text("int main(void) { int unused; return 0; }\n")
    proc = subprocess.run(["cc", *guestinit.INIT_CFLAGS, "-o", str(tmp_path / "warns"), str(source)], capture_output=True, text=True, check=False)
    assert "unused" in proc.stderr  # it does warn
    assert proc.returncode == 0, proc.stderr


def test_no_compiler_is_one_line_naming_the_packages(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    # A fresh cache (no init built yet) and a PATH without cc or gcc; QEMU named outright;
    # --no-pvh: no 30 MB kernel extracted into the cache first.
    env = dict(os.environ, PATH=str(empty), XDG_CACHE_HOME=str(tmp_path / "cache"), SANDBOX_ACCEL="tcg")
    proc = run_tracked([*SANDBOX, "run", "--qemu", "/usr/bin/qemu-system-x86_64", "--no-pvh", "--", "true"], env=env, cwd=tmp_path)
    assert proc.returncode == 125, proc.stderr
    assert proc.stderr.decode().splitlines() == ["sandbox: no C compiler (cc or gcc) on PATH to build the guest init (init.c): apt-get install gcc libc6-dev"]
