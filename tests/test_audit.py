"""The audit log keeps a command once, and a huge one as head, size and hash."""

from __future__ import annotations

import hashlib

from sandbox.confinement import audit


def test_short_argv_is_kept_whole() -> None:
    assert audit.summarize_argv(("sh", "-c", "echo hi")) == {"argv": ["sh", "-c", "echo hi"]}


def test_huge_argv_is_summed_up() -> None:
    argv = tuple(["printf", "%s\n"] + [str(i) for i in range(100_000)])
    entry = audit.summarize_argv(argv)
    assert entry["argc"] == len(argv)
    assert entry["bytes"] == sum(len(a) + 1 for a in argv)
    assert entry["sha256"] == hashlib.sha256("\0".join(argv).encode()).hexdigest()
    assert entry["argv_head"][:3] == ["printf", "%s\n", "0"]
    assert sum(len(a) + 1 for a in entry["argv_head"]) <= audit.ARGV_KEEP
    one_long = audit.summarize_argv(("x" * 100_000,))
    assert one_long["argv_head"] == ["x" * audit.ARGV_KEEP]
