"""The messages users see about their command (pure)."""

from __future__ import annotations

import errno

from sandbox.run import diagnostics
from sandbox.wire import protocol


def test_shell_quote() -> None:
    assert diagnostics.shell_quote("ls") == "ls"
    assert diagnostics.shell_quote("my cmd") == "my cmd"
    assert diagnostics.shell_quote("foo\nbar") == "$'foo\\nbar'"
    assert diagnostics.shell_quote("it's\t") == "$'it\\'s\\t'"
    assert diagnostics.shell_quote("") == "''"


def test_exec_failures_are_worded_as_a_shell_would() -> None:
    def msg(code: int, err: int, stage: int, argv0: str = "foo\nbar") -> str:
        return diagnostics.exec_failure(protocol.ExecFailed(code, err, stage), argv0, "/srv/x y")

    assert msg(127, errno.ENOENT, protocol.EXEC_STAGE_EXEC) == "$'foo\\nbar': command not found"
    assert msg(127, errno.ENOENT, protocol.EXEC_STAGE_EXEC, "./run") == "./run: No such file or directory"
    assert msg(126, errno.EACCES, protocol.EXEC_STAGE_EXEC, "/x") == "/x: Permission denied"
    assert msg(125, errno.EACCES, protocol.EXEC_STAGE_CWD) == (
        "cannot enter the working directory /srv/x y in the sandbox: Permission denied"
    )


def test_oom_messages_name_the_memory_size() -> None:
    assert diagnostics.guest_oom(1, 137, 512) == (
        "the command was killed by the out-of-memory killer in the guest; --memory is 512M"
    )
    assert diagnostics.guest_oom(2, 2, 2048).endswith("killed 2 of the command's processes; --memory is 2G")
    assert "--memory-limit 256M is too small" in diagnostics.host_oom(512, 256)


def test_no_network_hint() -> None:
    assert diagnostics.no_network("example.com") == "note: the command looked up example.com, but this sandbox has no network"
