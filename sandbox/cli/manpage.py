"""sandbox(1), the man page, rendered in roff from the command line's parser (cli.build_parser).

`python -m sandbox.cli.manpage` prints it; setup.sh installs it (sandbox.cli.install).
Every verb, option and choice comes from the parser, so the page cannot
drift from `sandbox VERB --help`.
"""

from __future__ import annotations

import argparse
import sys

from sandbox import __version__
from sandbox.cli.clitree import Argument, Option, Verb, describe
from sandbox.core.errors import EXIT_CANNOT_EXECUTE, EXIT_LAUNCHER, EXIT_NOT_FOUND, EXIT_TIMEOUT

SUMMARY = "run one command in a throw-away virtual machine"
# What the parser cannot say: how a run behaves (README.md says it at length).
BEHAVIOUR = (
    "sandbox run runs one command inside a throw-away QEMU virtual machine and behaves like running it directly: "
    "the same stdin, stdout and stderr, exit status, environment, working directory and user. "
    "The guest sees the host's root filesystem read-only; /home, your home directory, /tmp and the working directory "
    "are copy-on-write, so writes there stay in the VM and vanish with it, unless --share makes a directory read-write."
)

EXIT_STATUSES = (
    ("N", "the command's own status; 128+N when it died of signal N"),
    (str(EXIT_TIMEOUT), "the VM was killed after --timeout, as timeout(1) does"),
    (str(EXIT_LAUNCHER), "the sandbox itself failed, bad options included (one line on stderr says why)"),
    (str(EXIT_CANNOT_EXECUTE), "the command was found but cannot be executed"),
    (str(EXIT_NOT_FOUND), "the command was not found"),
)


def escape(text: str) -> str:
    """`text` as roff prose: backslashes and dashes literal, no line read as a request."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(f"\\&{line}" if line.startswith((".", "'")) else line for line in out.split("\n"))


def _bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def _option_tag(opt: Option) -> str:
    flags = ", ".join(_bold(f) for f in opt.flags)
    if opt.value is None:
        return flags
    return f"{flags}[={_italic(opt.value)}]" if opt.optional_value else f"{flags} {_italic(opt.value)}"


def _argument_tag(arg: Argument) -> str:
    return _italic(arg.label)


def _synopsis(verb: Verb) -> str:
    words = " ".join(("sandbox", *verb.words))
    rest = verb.synopsis.removeprefix(words)
    return _bold(words) + escape(rest)


def _items(verb: Verb) -> list[str]:
    """The .TP entries for a verb's arguments and options, under their groups' headings."""
    lines: list[str] = []
    for arg in verb.arguments:
        if arg.help:
            lines += [".TP", _argument_tag(arg), escape(arg.help)]
    group: str | None = None
    for opt in verb.options:
        if opt.is_help:
            continue  # said once, under OPTIONS
        if opt.group != group and opt.group is not None:
            lines += [".PP", _italic(opt.group) + ":"]
        group = opt.group
        lines += [".TP", _option_tag(opt)]
        if opt.help:
            lines.append(escape(opt.help))
    return lines


def render(parser: argparse.ArgumentParser) -> str:
    """The whole page, for the parser with all its verbs."""
    top = describe(parser)
    verbs = [v for v in top.walk() if v is not top]
    lines = [
        f'.TH SANDBOX 1 "" "sandbox {__version__}" "User Commands"',
        '.\\" Generated from the argparse parser by sandbox/cli/main/manpage.py: change the parser, not this page.',
        ".nh",  # no hyphenation: options and paths stay whole
        ".ad l",
        ".SH NAME",
        f"sandbox \\- {escape(SUMMARY)}",
        ".SH SYNOPSIS",
        ".nf",
        *(_synopsis(v) for v in verbs if not v.verbs),
        ".fi",
        ".SH DESCRIPTION",
        escape(top.help),
        ".PP",
        escape(BEHAVIOUR),
        ".PP",
        f"Every verb takes {_bold('-h')}, {_bold('--help')} for a summary of its options.",
        ".SH OPTIONS",
    ]
    for opt in top.options:
        lines += [".TP", _option_tag(opt), escape(opt.help)]
    lines.append(".SH COMMANDS")
    for verb in verbs:
        lines += [f".SS {_synopsis(verb)}", escape(verb.help)]
        if verb.verbs:
            lines += [".PP", "Verbs: " + ", ".join(_bold(v.words[-1]) for v in verb.verbs) + "."]
        lines += _items(verb)
    lines.append(".SH EXIT STATUS")
    for status, meaning in EXIT_STATUSES:
        lines += [".TP", _bold(status) if status.isdigit() else _italic(status), escape(meaning)]
    lines += [
        ".SH SEE ALSO",
        f"{_bold('qemu-system-x86_64')}(1), {_bold('virsh')}(1), {_bold('timeout')}(1); README.md in the source tree.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    from sandbox.cli.main import build_parser

    sys.stdout.write(render(build_parser()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
