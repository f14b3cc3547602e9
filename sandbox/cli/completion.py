"""Bash completion for sandbox, generated from the command line's parser (cli.build_parser).

`python -m sandbox.cli.completion` prints the script; setup.sh installs it
(sandbox.cli.install).  It completes verbs, options and their choices, files
for options that take a path, commands after `--`, and the names of
existing sandboxes (from `sandbox list --all --quiet`, which reads no QEMU's
figures) where a verb takes one.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from sandbox.cli.clitree import Argument, Verb, describe

# How each positional argument completes: names of sandboxes, a command, or nothing.
SANDBOX_NAME, COMMAND, NOTHING = "sandbox", "command", "-"


def argument_kind(verb: Verb, arg: Argument) -> str:
    """How `arg` of `verb` completes."""
    if arg.remainder:
        return COMMAND
    # A verb's NAME names an existing sandbox, except under `net`, whose NAMEs are networks.
    if arg.dest == "name" and len(verb.words) == 1:
        return SANDBOX_NAME
    return NOTHING


def _words(items: list[str]) -> str:
    return shlex.quote(" ".join(items))


def _case_pattern(words: tuple[str, ...]) -> str:
    return shlex.quote(" ".join(words))


def _verb_case(verb: Verb) -> list[str]:
    """One `case` arm that sets the verb's tables."""
    opts = [f for o in verb.options for f in o.flags]
    valued = [f for o in verb.options if o.value is not None and not o.optional_value for f in o.flags]
    optional = [f for o in verb.options if o.optional_value for f in o.flags]
    paths = [f for o in verb.options if o.path for f in o.flags]
    kinds = [argument_kind(verb, a) + ("+" if a.repeats else "") for a in verb.arguments]
    return [
        f"        {_case_pattern(verb.words)})",
        f"            verbs={_words([v.words[-1] for v in verb.verbs])} opts={_words(opts)}",
        f"            valued={_words(valued)} optional={_words(optional)} paths={_words(paths)} args={_words(kinds)} ;;",
    ]


def _choices_case(top: Verb) -> list[str]:
    """`case "VERB WORDS|FLAG"` arms giving each option's choices."""
    arms: dict[str, list[str]] = {}
    for verb in top.walk():
        for opt in verb.options:
            if opt.choices:
                for flag in opt.flags:
                    arms.setdefault(" ".join(opt.choices), []).append(shlex.quote(f"{' '.join(verb.words)}|{flag}"))
    return [f"        {'|'.join(keys)}) echo {shlex.quote(choices)} ;;" for choices, keys in arms.items()]


BODY = r"""
# Named sandboxes: `sandbox list --all --quiet` reads no QEMU's figures, so it is quick.
_sandbox_names() {
    "$1" list --all --quiet 2>/dev/null
}

# How positional argument $1 (from 0) of the current verb completes (see $args).
_sandbox_kind() {
    local kinds=($args)
    local n=${#kinds[@]}
    if (($1 < n)); then
        echo "${kinds[$1]%+}"
    elif ((n)) && [[ ${kinds[n-1]} == *+ ]]; then
        echo "${kinds[n-1]%+}"
    fi
}

_sandbox() {
    local cur=${COMP_WORDS[COMP_CWORD]}
    local self=${COMP_WORDS[0]/#\~/$HOME}
    local verb="" verbs opts valued optional paths args
    _sandbox_tables ""
    # Walk the words before the cursor: verbs, options (and the values they
    # take), positional arguments, and where a command begins.
    local i w npos=0 value_of="" command_at=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${COMP_WORDS[i]}
        if [[ -n $value_of ]]; then
            value_of=""
        elif [[ $w == "=" || $w == ":" ]]; then
            i=$((i + 1))  # A=B or HOST:GUEST, split by bash: one word with the ones around it
        elif [[ $w == "--" && " $args " == *" command "* ]]; then
            command_at=$((i + 1))
            break
        elif [[ $w == -* ]]; then
            if [[ ${COMP_WORDS[i+1]} == "=" ]]; then
                # bash splits --opt=VALUE at '=' into three words.
                value_of=$w
                i=$((i + 1))
            elif [[ " $valued " == *" $w "* ]]; then
                value_of=$w
            elif [[ " $optional " == *" $w "* && " $(_sandbox_choices "$verb" "$w") " == *" ${COMP_WORDS[i+1]} "* ]]; then
                value_of=$w
            fi
        elif [[ -n $verbs && " $verbs " == *" $w "* ]]; then
            verb=${verb:+$verb }$w
            _sandbox_tables "$verb"
        elif [[ $(_sandbox_kind $npos) == command ]]; then
            command_at=$i
            break
        else
            npos=$((npos + 1))
        fi
    done
    # The value after '=': bash makes the '=' a word of its own.
    if [[ $cur == "=" ]]; then
        value_of=${COMP_WORDS[COMP_CWORD-1]}
        cur=""
    elif ((COMP_CWORD >= 2)) && [[ ${COMP_WORDS[COMP_CWORD-1]} == "=" ]]; then
        value_of=${COMP_WORDS[COMP_CWORD-2]}
    fi
    COMPREPLY=()
    if ((command_at)); then
        if ((COMP_CWORD == command_at)); then
            mapfile -t COMPREPLY < <(compgen -c -- "$cur" | sort -u)
        else
            compopt -o filenames 2>/dev/null
            mapfile -t COMPREPLY < <(compgen -f -- "$cur")
        fi
    elif [[ -n $value_of ]]; then
        local choices
        choices=$(_sandbox_choices "$verb" "$value_of")
        if [[ -n $choices ]]; then
            mapfile -t COMPREPLY < <(compgen -W "$choices" -- "$cur")
        elif [[ " $paths " == *" $value_of "* ]]; then
            compopt -o filenames 2>/dev/null
            mapfile -t COMPREPLY < <(compgen -f -- "$cur")
        fi
    elif [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$opts" -- "$cur")
    elif [[ -n $verbs ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$verbs" -- "$cur")
    else
        case $(_sandbox_kind $npos) in
            sandbox) mapfile -t COMPREPLY < <(compgen -W "$(_sandbox_names "$self")" -- "$cur") ;;
            command) mapfile -t COMPREPLY < <(compgen -c -- "$cur" | sort -u) ;;
        esac
    fi
}
complete -F _sandbox sandbox
"""


def bash(parser: argparse.ArgumentParser) -> str:
    """The bash completion script for `parser`."""
    top = describe(parser)
    lines = [
        "# bash completion for sandbox(1).",
        "# Generated from its argparse parser by sandbox/cli/main/completion.py: change the parser, not this file.",
        "",
        "# Sets the tables of verb $1 (\"\" for the top, \"net create\"): its verbs, options, the options",
        "# that take a value, take one after '=' only, take a path; how its positional arguments complete.",
        "_sandbox_tables() {",
        '    case "$1" in',
    ]
    for verb in top.walk():
        lines += _verb_case(verb)
    lines += [
        "        *) verbs='' opts='' valued='' optional='' paths='' args='' ;;",
        "    esac",
        "}",
        "",
        "# The choices of option $2 of verb $1.",
        "_sandbox_choices() {",
        '    case "$1|$2" in',
        *_choices_case(top),
        "    esac",
        "}",
    ]
    return "\n".join(lines) + "\n" + BODY


def main() -> int:
    from sandbox.cli.main import build_parser

    sys.stdout.write(bash(build_parser()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
