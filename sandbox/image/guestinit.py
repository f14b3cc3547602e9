"""Builds the static guest init (guest-init/) and the host TSC probe (tsc_khz.c), cached by source hash."""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from sandbox.core import cache, progress
from sandbox.core.errors import InitramfsError, ToolMissingError

log = logging.getLogger(__name__)

# No -Werror: this runs with the user's gcc, and a newer one's new warning
# must not break every first run (tests/test_guestinit.py adds -Werror).
INIT_CFLAGS = ["-Os", "-static", "-Wall", "-Wextra", "-fno-asynchronous-unwind-tables", "-s"]
TSC_CFLAGS = ["-O2", "-Wall", "-Wextra"]
COMPILER_HINT = "apt-get install gcc libc6-dev"


def _source_dir() -> Path:
    """Where guest-init/ is (shipped as sandbox.guest_init).

    Asked of the import system directly: importlib.resources would pull in
    zipfile and friends on every start, and gcc needs real files anyway.
    """
    spec = importlib.util.find_spec("sandbox.guest_init")
    if spec is None or not spec.submodule_search_locations:
        raise InitramfsError("the guest init sources (sandbox.guest_init) are missing from the installation")
    return Path(list(spec.submodule_search_locations)[0])


def _compile(what: str, out: Path, sources: list[Path], flags: list[str]) -> None:
    """One gcc invocation over all of `sources` into `out` (atomically)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ToolMissingError(f"no C compiler (cc or gcc) on PATH to build {what}: {COMPILER_HINT}")
    # A name of this build's own: two launchers building the same binary at once (two first runs) must not share it.
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}-{secrets.token_hex(4)}")
    proc = subprocess.run([cc, *flags, "-o", str(tmp), *map(str, sources)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = (proc.stderr.strip().splitlines() or ["compiler failed"])[-1]
        hint = f" ({COMPILER_HINT} for static glibc)" if "-lc" in proc.stderr or "crt" in proc.stderr else ""
        raise InitramfsError(f"cannot build {what}: {first}{hint}")
    tmp.replace(out)


def _built(name: str, what: str, doing: str, sources: list[Path], flags: list[str], headers: list[Path]) -> Path:
    """`sources` (`what`, for messages; `doing`, for the progress line) compiled with `flags`, cached by the names and texts of every source and header and the flags."""
    files = sorted([*sources, *headers], key=lambda f: f.name)
    key = cache.content_hash(*(part for f in files for part in (f.name.encode(), f.read_bytes())), " ".join(flags).encode())
    out = cache.cache_dir() / f"{name}-{key}"
    if not out.exists():
        log.info("building %s", out)
        with progress.step(doing):
            _compile(what, out, sources, flags)
    return out


def init_sources() -> tuple[list[Path], list[Path]]:
    """The guest init's C files and headers (guest-init/*.c, *.h), in a stable order."""
    src = _source_dir()
    return sorted(src.glob("*.c")), sorted(src.glob("*.h"))


def init_binary() -> Path:
    """The static guest init, built on first use from every file of guest-init/."""
    sources, headers = init_sources()
    if not sources:
        raise InitramfsError(f"the guest init's sources are missing from {_source_dir()}")
    return _built("init", "the guest init (guest-init/*.c)", "building the guest image (its init)", sources, INIT_CFLAGS, headers)


def tsc_probe() -> Path:
    """The host TSC-rate probe (a host-side helper, shipped beside this module), built on first use."""
    return _built("tsc_khz", "the TSC probe (tsc_khz.c)", "building the TSC probe", [Path(__file__).with_name("tsc_khz.c")], TSC_CFLAGS, [])
