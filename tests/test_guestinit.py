"""Building the guest init and the TSC probe with the user's compiler."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, SANDBOX, run_tracked
from sandbox.image import guestinit


def test_the_sources_compile_without_a_warning(tmp_path: Path) -> None:
    # The project's own warning gate: users build without -Werror, so that a
    # newer gcc's new warning cannot break their first run.
    init_sources, _ = guestinit.init_sources()
    assert {f.name for f in init_sources} == {f.name for f in (REPO / "guest-init").glob("*.c")}
    assert len(init_sources) > 10  # one file per concern, all of them built
    for name, sources, flags in (("init", init_sources, guestinit.INIT_CFLAGS), ("tsc_khz", [REPO / "sandbox" / "image" / "tsc_khz.c"], guestinit.TSC_CFLAGS)):
        proc = subprocess.run(["cc", *flags, "-Werror", "-o", str(tmp_path / name), *map(str, sources)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr


def test_a_change_in_any_file_of_the_init_rebuilds_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A copy of guest-init/ as the installed package, and a cache of its own.
    src = tmp_path / "guest_init"
    shutil.copytree(REPO / "guest-init", src, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(guestinit, "_source_dir", lambda: src)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = guestinit.init_binary()
    assert guestinit.init_binary() == first  # cached
    seen = {first}
    for name in ("init.h", "protocol.h", "mux.c"):
        path = src / name
        path.write_text(path.read_text() + "\n/* changed */\n")
        built = guestinit.init_binary()
        assert built not in seen and built.exists(), name
        seen.add(built)
    (src / "extra.c").write_text("int sandbox_extra_unit;\n")  # a new file is built in too
    assert guestinit.init_binary() not in seen


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
    assert proc.stderr.decode().splitlines() == ["sandbox: no C compiler (cc or gcc) on PATH to build the guest init (guest-init/*.c): apt-get install gcc libc6-dev"]
