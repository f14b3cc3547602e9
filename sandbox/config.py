"""User defaults: the environment (SANDBOX_*) and ~/.config/sandbox/config.toml."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from .errors import UsageError

ACCELS = ("auto", "kvm", "tcg")


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "sandbox" / "config.toml"


@functools.cache
def _file() -> dict[str, Any]:
    path = config_path()
    if not path.exists():
        return {}  # the common case: no parser to import on the start-up path
    import tomllib

    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: {exc}") from None


def accel(flag: str | None) -> str:
    """The accelerator asked for: --accel, else SANDBOX_ACCEL, else the config file's `accel`, else auto."""
    for value, source in (
        (flag, "--accel"),
        (os.environ.get("SANDBOX_ACCEL") or None, "SANDBOX_ACCEL"),
        (_file().get("accel"), str(config_path())),
    ):
        if value is None:
            continue
        if value not in ACCELS:
            raise UsageError(f"{source}: accelerator {value!r} is not one of {', '.join(ACCELS)}")
        return str(value)
    return "auto"
