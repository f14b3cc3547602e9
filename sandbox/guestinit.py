"""Builds the static guest init (and the host TSC probe) from guest-init/, cached by source hash."""

from __future__ import annotations

import logging
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from . import cache
from .errors import InitramfsError, ToolMissingError

log = logging.getLogger(__name__)

INIT_CFLAGS = ["-Os", "-static", "-Wall", "-Wextra", "-Werror", "-fno-asynchronous-unwind-tables", "-s"]
COMPILER_HINT = "apt-get install gcc libc6-dev"


def _sources() -> dict[str, bytes]:
    pkg = resources.files("sandbox.guest_init")
    return {name: (pkg / name).read_bytes() for name in ("init.c", "protocol.h", "tsc_khz.c")}


def _compile(out: Path, source: str, flags: list[str]) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ToolMissingError(f"no C compiler to build the guest init; {COMPILER_HINT}")
    pkg = resources.files("sandbox.guest_init")
    with resources.as_file(pkg) as srcdir:
        tmp = out.with_name(f".tmp-{out.name}")
        proc = subprocess.run(
            [cc, *flags, "-o", str(tmp), str(Path(srcdir) / source)],
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = (proc.stderr.strip().splitlines() or ["compiler failed"])[-1]
        hint = f" ({COMPILER_HINT} for static glibc)" if "-lc" in proc.stderr or "crt" in proc.stderr else ""
        raise InitramfsError(f"cannot build guest {source}: {first}{hint}")
    tmp.replace(out)


def _built(name: str, source: str, flags: list[str]) -> Path:
    src = _sources()
    key = cache.content_hash(*(src[n] for n in sorted(src)), " ".join(flags).encode())
    out = cache.cache_dir() / f"{name}-{key}"
    if not out.exists():
        log.info("building %s", out)
        _compile(out, source, flags)
    return out


def init_binary() -> Path:
    """The static guest init, built on first use."""
    return _built("init", "init.c", INIT_CFLAGS)


def tsc_probe() -> Path:
    """The host TSC-rate probe, built on first use."""
    return _built("tsc_khz", "tsc_khz.c", ["-O2"])
