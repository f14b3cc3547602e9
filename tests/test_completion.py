"""The bash completion, generated from the parser, run in a real bash."""

from __future__ import annotations

import argparse
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import SANDBOX, run_sandbox, run_tracked
from sandbox.cli import completion
from sandbox.cli.main import build_parser

# The venv's own command, as a user's shell would run it (COMP_WORDS[0]).
COMMAND = str(Path(sys.executable).parent / "sandbox")

Complete = Callable[..., list[str]]


@pytest.fixture
def complete(tmp_path: Path) -> Complete:
    """complete(word, ..., cur) -> what bash offers for the last word of `sandbox word ... cur`."""
    script = tmp_path / "sandbox.bash"
    script.write_text(completion.bash(build_parser()))

    def run(*words: str) -> list[str]:
        proc = subprocess.run(
            ["bash", "--norc", "--noprofile", "-c",
             'source "$0" || exit 99; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _sandbox; printf "%s\\n" "${COMPREPLY[@]}"',
             str(script), COMMAND, *words],
            capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False,
        )  # fmt: skip
        assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
        return [line for line in proc.stdout.splitlines() if line]

    return run


def sub_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def flags(parser: argparse.ArgumentParser) -> set[str]:
    return {f for a in parser._actions for f in a.option_strings}


def test_verbs(complete: Complete) -> None:
    parser = build_parser()
    assert set(complete("")) == set(sub_parsers(parser))
    assert complete("r") == ["run", "rm"]
    assert complete("net", "") == list(sub_parsers(sub_parsers(parser)["net"]))


def test_run_options_and_their_choices(complete: Complete) -> None:
    run = sub_parsers(build_parser())["run"]
    assert set(complete("run", "-")) == flags(run)
    assert complete("run", "--ti") == ["--timeout", "--timings"]
    # Options before the cursor are skipped, with their values (bash splits HOST:GUEST and A=B).
    assert set(complete("run", "--timeout", "5", "--share", "/tmp", "--")) == {f for f in flags(run) if f.startswith("--")}
    assert complete("run", "--share", "/tmp", ":", "/x", ":", "ro", "--net", "nat", "=", "n1", "--ti") == ["--timeout", "--timings"]
    assert complete("run", "--accel", "") == ["auto", "kvm", "tcg"]
    assert complete("run", "--x11", "xpra", "--security", "s") == ["selinux"]
    # --timings=json: bash splits it at '='.
    assert complete("run", "--timings", "=", "") == ["text", "json"]
    assert complete("run", "--timings", "=", "j") == ["json"]


def test_paths_and_commands(complete: Complete, tmp_path: Path) -> None:
    (tmp_path / "kernel-image").write_bytes(b"")
    assert complete("run", "--kernel", "kernel-") == ["kernel-image"]
    assert "echo" in complete("run", "--", "ech")
    assert "echo" in complete("run", "--timeout", "5", "ech")  # the first word that is not an option starts the command
    assert complete("run", "--", "ls", "kernel-") == ["kernel-image"]
    assert complete("exec", "-e", "A", "=", "B", "web", "ls", "kernel-") == ["kernel-image"]


@pytest.mark.vm
def test_names_of_sandboxes(complete: Complete) -> None:
    name = f"complete-{uuid.uuid4().hex[:8]}"
    assert run_sandbox("true", run_opts=("--name", name)).returncode == 0
    try:
        listed = subprocess.run([*SANDBOX, "list", "--all", "--quiet"], capture_output=True, text=True, timeout=60, check=True)
        assert name in listed.stdout.splitlines()
        for verb in ("info", "logs", "wait", "rm"):
            assert name in complete(verb, name[:12]), verb
        assert name in complete("exec", "-w", "/", name[:12])
        assert name in complete("rm", name, name[:12])  # rm takes several
        assert complete("exec", name, "ech") != [] and name not in complete("exec", name, "")
    finally:
        assert run_tracked([*SANDBOX, "rm", name]).returncode == 0
    assert name not in complete("info", name[:12])
