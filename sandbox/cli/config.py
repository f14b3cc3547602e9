"""User defaults for `sandbox run`'s options: ~/.config/sandbox/config.toml and the environment.

The file holds `KEY = VALUE` lines, a key being an option's long name
without its dashes (`memory = "1G"`, `cpus = 2`, `cold = true`,
`hide = [".aws-old"]`); each value is read by the option's own parser, as
the flag would be.  SANDBOX_ACCEL and SANDBOX_CONNECT come before the
file, and flags on the command line before both.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.cli import options
from sandbox.core.errors import UsageError

DEFAULT = "default"


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


@dataclass(frozen=True)
class Setting:
    """One option's default, and where it came from."""

    key: str
    value: Any  # what the option's parser made of it
    written: Any  # as its source has it
    source: str  # DEFAULT, the config file's path, or the environment variable's name


def resolve(file: Mapping[str, Any], path: str, env: Mapping[str, str]) -> tuple[Setting, ...]:
    """Every settable option's default: its environment variable, else the file's value, else its own."""
    known = {opt.key for opt in options.SETTABLE}
    for key in file:
        if key not in known:
            raise UsageError(f"{path}: unknown setting {key!r} (sandbox config lists them)")
    out = []
    for opt in options.SETTABLE:
        variable = env.get(opt.env) if opt.env else None
        if variable and opt.env:
            out.append(Setting(opt.key, opt.read_setting(variable, f"{opt.env}={variable}"), variable, opt.env))
        elif opt.key in file:
            value = file[opt.key]
            out.append(Setting(opt.key, opt.read_setting(value, f"{path}: {opt.key} = {json.dumps(value)}"), value, path))
        else:
            out.append(Setting(opt.key, opt.default, opt.default, DEFAULT))
    return tuple(out)


@functools.cache
def settings() -> tuple[Setting, ...]:
    """This user's settings (read once per process)."""
    return resolve(_file(), str(config_path()), os.environ)


def defaults() -> dict[str, Any]:
    """key -> value of every option whose default the environment or the config file sets."""
    return {s.key: s.value for s in settings() if s.source != DEFAULT}


def forget() -> None:
    """Read the file and the environment again on the next call (for tests)."""
    _file.cache_clear()
    settings.cache_clear()


def accel(flag: str | None) -> str:
    """The accelerator asked for: --accel, else SANDBOX_ACCEL, else the config file's `accel`, else auto."""
    if flag is not None:
        return flag
    return str(next(s.value for s in settings() if s.key == "accel"))


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    return json.dumps(value if isinstance(value, (bool, int, float, list)) else str(value))


def describe() -> dict[str, Any]:
    """What `sandbox config` shows: the file, and every setting with its source."""
    path = config_path()
    rows = [{"key": s.key, "value": s.written if not isinstance(s.written, Path) else str(s.written), "source": s.source} for s in settings()]
    return {"file": str(path), "exists": path.exists(), "settings": rows}


def format_table(d: Mapping[str, Any]) -> str:
    """`sandbox config` as text: a KEY VALUE SOURCE table under the file's path."""
    rows = [("KEY", "VALUE", "SOURCE")] + [(r["key"], _shown(r["value"]), r["source"]) for r in d["settings"]]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    head = f"config file: {d['file']}" + ("" if d["exists"] else " (none)")
    return "\n".join([head, *(f"{k:<{widths[0]}}  {v:<{widths[1]}}  {src}" for k, v, src in rows)])
