"""Puts `sandbox`, its man page and its bash completion where a shell and man(1) find them.

`python -m sandbox.cli.install [--prefix /usr/local]` links PREFIX/bin/sandbox to
the `sandbox` command of the environment it runs in (the venv), and writes
PREFIX/share/man/man1/sandbox.1 and
PREFIX/share/bash-completion/completions/sandbox, both generated from the
parser.  setup.sh runs it as root with /usr/local: on Debian /usr/local/bin
comes before /usr/bin on PATH, so `sandbox` is this tool rather than
SELinux's /usr/bin/sandbox (policycoreutils), and man reads section 1 (ours)
before 8 (SELinux's sandbox(8)).  $DESTDIR, if set, is put in front of
every path written (a staged install), not in front of the link's target.
Running it again replaces what it installed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from sandbox.core.cache import write_atomic
from sandbox.core.errors import EXIT_LAUNCHER, SandboxError

DEFAULT_PREFIX = Path("/usr/local")
MAN_PAGE = Path("share/man/man1/sandbox.1")
BASH_COMPLETION = Path("share/bash-completion/completions/sandbox")


class InstallError(SandboxError):
    """Something in the way of the installation."""


def command() -> Path:
    """The `sandbox` command of the environment running this (e.g. .venv/bin/sandbox)."""
    path = Path(sysconfig.get_path("scripts")) / "sandbox"
    if not os.access(path, os.X_OK):
        raise InstallError(f"no sandbox command at {path}: install the package into this environment first (pip install .)")
    return path


def _staged(destdir: Path | None, path: Path) -> Path:
    return destdir / path.relative_to(path.anchor) if destdir else path


def _link(link: Path, target: Path) -> None:
    """`link` -> `target`, replacing an earlier link (never a file someone else put there)."""
    if link.exists() and not link.is_symlink():
        raise InstallError(f"{link} exists and is not a link (another installation?): remove it, or choose another --prefix")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".tmp-{link.name}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


def install(prefix: Path, destdir: Path | None = None) -> list[str]:
    """Install under `prefix` (staged under `destdir`); what was done, a line each."""
    from sandbox.cli import completion, manpage
    from sandbox.cli.main import build_parser

    if not prefix.is_absolute():
        raise InstallError(f"--prefix {prefix}: not an absolute path")
    target = command()
    link = _staged(destdir, prefix / "bin" / "sandbox")
    _link(link, target)
    done = [f"{link} -> {target}"]
    parser = build_parser()
    for rel, text in ((MAN_PAGE, manpage.render(parser)), (BASH_COMPLETION, completion.bash(parser))):
        path = _staged(destdir, prefix / rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text.encode())
        done.append(str(path))
    if destdir is None:
        found = shutil.which("sandbox")
        if found is None or Path(found).resolve() != target.resolve():
            done.append(f"note: `sandbox` on this PATH is {found or 'nothing'}: put {prefix / 'bin'} first")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.cli.install", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--prefix", type=Path, default=DEFAULT_PREFIX, help=f"default {DEFAULT_PREFIX}")
    args = parser.parse_args(argv)
    destdir = os.environ.get("DESTDIR")
    try:
        for line in install(args.prefix, Path(destdir) if destdir else None):
            print(line)
    except SandboxError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return EXIT_LAUNCHER
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"sandbox: cannot install: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_LAUNCHER
    return 0


if __name__ == "__main__":
    sys.exit(main())
