"""The command line's verbs, options and arguments as plain data, read from its argparse parser.

The man page (manpage.py) and the shell completion (completion.py) are
generated from this, so that neither can drift from the parser.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# argparse's own group titles: not worth a heading of their own.
_DEFAULT_GROUPS = ("options", "optional arguments", "positional arguments")
# Value names that say the value is a file or directory.
_PATH_WORDS = ("PATH", "DIR", "FILE", "HOST")


@dataclass(frozen=True)
class Option:
    """One option of a verb."""

    flags: tuple[str, ...]
    value: str | None  # the value's name; None: the option takes no value
    optional_value: bool  # the value may be left out (nargs "?": --timings or --timings=json)
    choices: tuple[str, ...]
    help: str
    group: str | None  # the heading it is listed under (--help's argument groups)
    path: bool  # its value names a file or directory
    is_help: bool  # -h/--help, which every verb has


@dataclass(frozen=True)
class Argument:
    """One positional argument of a verb."""

    dest: str
    name: str  # as shown: its metavar, else its dest
    nargs: str | int | None
    help: str

    @property
    def remainder(self) -> bool:
        """It takes the rest of the line: a command and its arguments."""
        return self.nargs == argparse.REMAINDER

    @property
    def repeats(self) -> bool:
        return self.nargs in ("+", "*")

    @property
    def label(self) -> str:
        if self.remainder:
            return self.name
        name = self.name.upper()
        if self.nargs == "?":
            return f"[{name}]"
        if self.nargs == "+":
            return f"{name}..."
        return f"[{name}...]" if self.nargs == "*" else name


@dataclass(frozen=True)
class Verb:
    """The whole command (no words) or one verb (`run`, `net create`), with its own verbs, if any."""

    words: tuple[str, ...]
    help: str
    options: tuple[Option, ...]
    arguments: tuple[Argument, ...]
    verbs: tuple[Verb, ...]

    @property
    def synopsis(self) -> str:
        """`sandbox run [OPTIONS] -- CMD [ARGS...]`."""
        parts = ["sandbox", *self.words]
        if any(not o.is_help for o in self.options):
            parts.append("[OPTIONS]")
        if self.verbs:
            parts.append("VERB")
        parts += [a.label for a in self.arguments]
        return " ".join(parts)

    def walk(self) -> Iterator[Verb]:
        """This verb and every verb below it, depth first, in the parser's order."""
        yield self
        for verb in self.verbs:
            yield from verb.walk()


def _text(help: str | None) -> str:
    return "" if help is None or help == argparse.SUPPRESS else help


def _option(action: argparse.Action, group: str | None) -> Option:
    takes_value = action.nargs != 0
    choices = tuple(str(c) for c in action.choices) if action.choices is not None else ()
    value = None
    if takes_value:
        if isinstance(action.metavar, str):
            value = action.metavar
        elif choices:
            value = "|".join(choices)
        else:
            value = action.dest.upper()
    path = value is not None and (action.type is Path or any(w in value for w in _PATH_WORDS))
    return Option(
        flags=tuple(action.option_strings), value=value, optional_value=action.nargs == "?", choices=choices,
        help=_text(action.help), group=group, path=path, is_help=isinstance(action, argparse._HelpAction),
    )  # fmt: skip


def describe(parser: argparse.ArgumentParser, words: tuple[str, ...] = (), help: str = "") -> Verb:
    """`parser` as a Verb tree (its sub-parsers become its verbs)."""
    groups = {id(a): g.title for g in parser._action_groups for a in g._group_actions}
    options, arguments, verbs = [], [], []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: _text(a.help) for a in action._choices_actions}
            verbs += [describe(sub, (*words, name), helps.get(name, "")) for name, sub in action.choices.items()]
        elif action.option_strings:
            title = groups.get(id(action))
            options.append(_option(action, None if title in _DEFAULT_GROUPS else title))
        else:
            name = action.metavar if isinstance(action.metavar, str) else action.dest
            arguments.append(Argument(action.dest, name, action.nargs, _text(action.help)))
    return Verb(words, help or parser.description or "", tuple(options), tuple(arguments), tuple(verbs))
