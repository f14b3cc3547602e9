"""The one-line messages a user sees about how the guest command fared (pure)."""

from __future__ import annotations

import os
import signal

from sandbox.wire import protocol


def shell_quote(text: str) -> str:
    """`text` as bash shows a command name: as it is, or $'...' when it holds control characters."""
    if not text:
        return "''"
    if all(c.isprintable() for c in text):
        return text
    out = []
    for c in text:
        if c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c in "\\'":
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            for b in c.encode("utf-8", "surrogateescape"):
                out.append(f"\\x{b:02x}")
    return "$'" + "".join(out) + "'"


def exec_failure(fail: protocol.ExecFailed, argv0: str, cwd: str) -> str:
    """Why the guest could not start the command, worded as a shell would."""
    reason = os.strerror(fail.errno)
    if fail.stage == protocol.EXEC_STAGE_CWD:
        return f"cannot enter the working directory {shell_quote(cwd)} in the sandbox: {reason}"
    if fail.stage == protocol.EXEC_STAGE_CREDS:
        return f"cannot take on your user and groups in the sandbox: {reason}"
    if fail.stage == protocol.EXEC_STAGE_RLIMIT:
        return f"cannot apply your resource limits in the sandbox: {reason}"
    if fail.code == 127 and "/" not in argv0:
        return f"{shell_quote(argv0)}: command not found"
    return f"{shell_quote(argv0)}: {reason}"


def guest_oom(count: int, status: int, memory_mb: int) -> str:
    """The guest's OOM killer struck (the command's own status is kept)."""
    size = format_mb(memory_mb)
    if status == 128 + signal.SIGKILL:
        return f"the command was killed by the out-of-memory killer in the guest; --memory is {size}"
    what = "one of the command's processes" if count == 1 else f"{count} of the command's processes"
    return f"the out-of-memory killer in the guest killed {what}; --memory is {size}"


def host_oom(memory_mb: int, limit_mb: int | None) -> str:
    """QEMU itself was killed by the host's OOM killer inside its cgroup."""
    limit = f"--memory-limit {format_mb(limit_mb)}" if limit_mb else "the cgroup memory limit"
    return (
        f"QEMU was killed by the host's out-of-memory killer: {limit} is too small for "
        f"a guest with --memory {format_mb(memory_mb)} (raise the limit or lower --memory)"
    )


def no_network(name: str) -> str:
    return f"note: the command looked up {shell_quote(name)}, but this sandbox has no network"


def format_mb(mb: int) -> str:
    return f"{mb // 1024}G" if mb % 1024 == 0 else f"{mb}M"
