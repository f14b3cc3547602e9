"""sandbox(1): generated from the parser, checked against the parser, rendered by man without a warning."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.cli import manpage
from sandbox.cli.main import build_parser


def verbs(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every verb's words and parser, read from argparse itself (not from what the page is made with)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*words, name), sub
                yield from verbs(sub, (*words, name))


def rendered(tmp_path: Path) -> tuple[str, str]:
    """(the page as man shows it, man's warnings)."""
    page = tmp_path / "sandbox.1"
    page.write_text(manpage.render(build_parser()))
    env = dict(os.environ, MANWIDTH="100", MANPAGER="cat", LC_ALL="C.UTF-8")
    proc = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def sections(text: str) -> dict[tuple[str, ...], str]:
    """The COMMANDS section's subsections, by the verb words of their headings (`   sandbox net create [OPTIONS] NAME`)."""
    out: dict[tuple[str, ...], str] = {}
    key: tuple[str, ...] | None = None
    for line in text.splitlines():
        m = re.match(r"^ {3}sandbox((?: [a-z][a-z-]*)+)", line)
        if m:
            key = tuple(m.group(1).split())
            out[key] = ""
        elif re.match(r"^\S", line):
            key = None  # the next section (EXIT STATUS)
        elif key is not None:
            out[key] += line + "\n"
    return out


def mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def test_man_renders_the_page_without_a_warning(tmp_path: Path) -> None:
    text, warnings = rendered(tmp_path)
    assert warnings == ""
    assert text.startswith("SANDBOX(1)")
    groff = subprocess.run(["groff", "-man", "-ww", "-z", "-Tutf8"], input=manpage.render(build_parser()), capture_output=True, text=True, check=False)
    assert (groff.returncode, groff.stderr) == (0, "")


def test_the_page_has_every_verb_option_and_choice_of_the_parser(tmp_path: Path) -> None:
    text, _ = rendered(tmp_path)
    found = sections(text)
    parser = build_parser()
    checked = 0
    for words, sub in verbs(parser):
        assert words in found, f"no section for sandbox {' '.join(words)}"
        section = found[words]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue  # said once, under OPTIONS
            for flag in action.option_strings:
                assert mentions(section, flag), f"sandbox {' '.join(words)}: {flag} is missing"
                checked += 1
            for choice in action.choices or ():
                if not isinstance(action, argparse._SubParsersAction):
                    assert mentions(section, str(choice)), f"sandbox {' '.join(words)}: choice {choice} is missing"
        assert mentions(text.split("\nDESCRIPTION\n")[0], "sandbox " + " ".join(words)), f"sandbox {' '.join(words)} is not in SYNOPSIS"
    assert checked > 100
    top = text.split("\nCOMMANDS\n")[0]
    for flag in ("-h", "--help", "--version"):
        assert mentions(top, flag)


def test_every_verb_and_option_has_a_description() -> None:
    # Otherwise the page lists it bare.
    bare = []
    for words, sub in verbs(build_parser()):
        for action in sub._actions:
            if action.option_strings and not action.help:
                bare.append(f"sandbox {' '.join(words)} {action.option_strings[-1]}")
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                bare += [f"sandbox {' '.join(words)} {a.dest}" for a in action._choices_actions if not a.help]
    assert bare == []


@pytest.mark.parametrize("text, roff", [
    ("--share a\\:b", "\\-\\-share a\\e:b"),
    (".hidden\n'quoted", "\\&.hidden\n\\&'quoted"),
])  # fmt: skip
def test_escape_keeps_dashes_backslashes_and_leading_dots_literal(text: str, roff: str) -> None:
    assert manpage.escape(text) == roff
