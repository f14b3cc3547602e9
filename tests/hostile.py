"""A malicious guest behind the backend interface, with no QEMU: the launcher's side is the real one.

`HostileBackend` (registered in front of the real backends by `main`) hands
the runner a `HostileGuest` whose channels are socketpairs; a thread plays
the guest, writing what a `Script` says (random, oversized, truncated,
out-of-order or never-ending bytes, on any channel) as fast as the
launcher takes it.  `main` runs the real CLI with it, as a child process
of the test, which measures its time, memory and output
(tests/test_hostile_guest.py).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.backends import base as backends
from sandbox.wire import protocol
from sandbox.backends.base import Attempt, BootOnce, BootSpec, Channels, Prepared, RunContext, RunResult
from sandbox.core.errors import MachineError
from sandbox.image.host import QemuInfo
from sandbox.plan.request import RunRequest

CHANNELS = ("control", "stdin", "stdout", "stderr", "console", "exec")


@dataclass(frozen=True)
class Write:
    """Bytes the guest sends on a channel; `forever`: again and again until the machine is killed."""

    channel: str
    data: bytes
    forever: bool = False


@dataclass(frozen=True)
class Script:
    """What the hostile guest does: its writes in order, then it ends (with `status`) or hangs."""

    writes: tuple[Write, ...] = ()
    hang: bool = False  # never end by itself (the launcher must give up on it)
    status: int = 0  # the machine's exit status when it ends by itself

    def to_json(self) -> str:
        return json.dumps({"writes": [[w.channel, w.data.hex(), w.forever] for w in self.writes], "hang": self.hang, "status": self.status})

    @classmethod
    def from_json(cls, text: str) -> Script:
        raw = json.loads(text)
        return cls(tuple(Write(c, bytes.fromhex(d), f) for c, d, f in raw["writes"]), raw["hang"], raw["status"])


def line(text: str, sent: int = 1) -> bytes:
    """A control line as the init writes it: its send time, then the message."""
    return f"{sent} {text}\n".encode()


# The init's usual opening: reported in, the command started.
STARTED = (Write("control", line("T init_start 1") + line("T command_exec 2")),)


@dataclass
class HostileGuest:
    """A machine that is only a thread writing a script into the launcher's channels (implements backend.Guest)."""

    script: Script
    status: int | None = None
    half_close: bool = True
    holds_spec: bool = False
    _ends: dict[str, socket.socket] = field(default_factory=dict)
    _killed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        ours: dict[str, socket.socket] = {}
        for name in CHANNELS:
            ours[name], self._ends[name] = socket.socketpair()
        self.channels = Channels(ours["control"], ours["stdin"], ours["stdout"], ours["stderr"], ours["console"], exec=ours["exec"])
        self._end_r, self._end_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._play, daemon=True)

    # ---- the guest -------------------------------------------------------------

    def _play(self) -> None:
        try:
            for w in self.script.writes:
                sock = self._ends[w.channel]
                while not self._killed.is_set():
                    sock.sendall(w.data)
                    if not w.forever:
                        break
        except OSError:
            pass  # the launcher closed its end: as a machine it would go on, or not
        if self.script.hang:
            self._killed.wait()
        self._end(self.script.status)

    def _end(self, status: int) -> None:
        if self.status is None:
            self.status = status
            for s in self._ends.values():
                s.close()
            os.write(self._end_w, b"x")

    # ---- backend.Guest ------------------------------------------------------------

    @property
    def end_fd(self) -> int:
        return self._end_r

    def reap(self) -> int | None:
        return self.status

    def booted(self) -> None:
        pass

    def ready(self) -> bytes | None:
        return None

    def stop(self, soft_timeout: float = 1.0) -> int:
        self.kill()
        return self.status or 0

    def kill(self) -> None:
        self._killed.set()
        if self.status is None:
            self._end(-9)

    def finish(self) -> None:
        self.kill()

    def host_identity(self) -> tuple[str, str]:
        return "hostile", ""

    def pids(self) -> tuple[int, ...]:
        return ()

    def peak_rss_kb(self) -> int | None:
        return None

    def wait_built(self, timeout: float, attempt: int) -> None:
        self._thread.start()

    def explain(self, fatal: str) -> str:
        return ""

    def failure(self, message: str) -> MachineError:
        return MachineError(message)

    def __enter__(self) -> HostileGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._thread.join(5)
        self.channels.close()
        os.close(self._end_r)
        os.close(self._end_w)


class HostileBackend:
    """Runs every request on a HostileGuest playing the script in SANDBOX_HOSTILE_SCRIPT (implements backend.Backend)."""

    name = "hostile"
    confined_here = False
    local_files = True

    def __init__(self, request: RunRequest) -> None:
        self.script = Script.from_json(os.environ["SANDBOX_HOSTILE_SCRIPT"])

    def __enter__(self) -> HostileBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def prepare(self, request: RunRequest) -> Prepared:
        return Prepared("tcg", QemuInfo("hostile", "0", True, False), "microvm", Path("/nonexistent"), True, Path("/nonexistent"), "", None)

    def run(self, boot: BootSpec, ctx: RunContext, once: BootOnce) -> RunResult:
        return once(lambda: HostileGuest(self.script), Attempt(1, "cold, hostile"))

    def ready(self, request: RunRequest, boot: BootSpec) -> str | None:
        return "hostile"


def main() -> int:
    """The CLI, with the hostile backend in front of the real ones; its peak memory goes to SANDBOX_HOSTILE_PEAK."""
    from sandbox.cli import main as cli
    from sandbox.core.process import status_fields

    backends.BACKENDS.insert(0, backends.Registered("hostile", lambda r: True, "hostile:HostileBackend"))
    try:
        return cli.main(sys.argv[1:])
    finally:
        # VmHWM: this program's own peak (the rusage of a child counts its parent's pages from before the exec).
        Path(os.environ["SANDBOX_HOSTILE_PEAK"]).write_text(status_fields(os.getpid()).get("VmHWM", "0 kB").split()[0])


if __name__ == "__main__":
    sys.exit(main())
