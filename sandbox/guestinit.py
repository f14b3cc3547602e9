"""Builds the static guest init (guest-init/) and the host TSC probe (tsc_khz.c), cached by source hash."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
from pathlib import Path

from . import cache, progress
from .errors import InitramfsError, ToolMissingError

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


def _compile(what: str, out: Path, source: Path, flags: list[str]) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ToolMissingError(f"no C compiler (cc or gcc) on PATH to build {what} ({source.name}): {COMPILER_HINT}")
    tmp = out.with_name(f".tmp-{out.name}")
    proc = subprocess.run([cc, *flags, "-o", str(tmp), str(source)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = (proc.stderr.strip().splitlines() or ["compiler failed"])[-1]
        hint = f" ({COMPILER_HINT} for static glibc)" if "-lc" in proc.stderr or "crt" in proc.stderr else ""
        raise InitramfsError(f"cannot build {source.name}: {first}{hint}")
    tmp.replace(out)


def _built(name: str, what: str, doing: str, source: Path, flags: list[str], headers: tuple[Path, ...] = ()) -> Path:
    """`source` (`what`, for messages; `doing`, for the progress line) compiled with `flags`, cached by the hash of its text, its headers' and the flags."""
    key = cache.content_hash(*(f.read_bytes() for f in (source, *headers)), " ".join(flags).encode())
    out = cache.cache_dir() / f"{name}-{key}"
    if not out.exists():
        log.info("building %s", out)
        with progress.step(doing):
            _compile(what, out, source, flags)
    return out


def init_binary() -> Path:
    """The static guest init, built on first use."""
    src = _source_dir()
    return _built("init", "the guest init", "building the guest image (its init)", src / "init.c", INIT_CFLAGS, (src / "protocol.h",))


def tsc_probe() -> Path:
    """The host TSC-rate probe (a host-side helper, shipped beside this module), built on first use."""
    return _built("tsc_khz", "the TSC probe", "building the TSC probe", Path(__file__).with_name("tsc_khz.c"), TSC_CFLAGS)
