"""What the rest of sandbox needs from "a running guest", whatever runs it.

The direct QEMU backend (sandbox/qemu/backend.py) is one implementation;
a libvirt or a restored-snapshot backend would be others.  The relay
(sandbox/relay.py) and the runner see only this.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol

from . import protocol
from .errors import MachineError


@dataclass
class Channels:
    """The launcher's ends of the host/guest channels (see guest-init/protocol.h)."""

    control: socket.socket
    stdin: socket.socket
    stdout: socket.socket
    stderr: socket.socket
    console: socket.socket  # the guest's serial console (log only)
    x11: socket.socket | None = None
    exec: socket.socket | None = None  # `sandbox exec` processes (sandbox/execs.py)

    @classmethod
    def of_ports(cls, ports: dict[int, socket.socket], console: socket.socket, x11: bool) -> Channels:
        """The channels from the launcher's ends of the guest's ports (protocol.PORT_*)."""
        return cls(
            control=ports[protocol.PORT_CONTROL],
            stdin=ports[protocol.PORT_STDIN],
            stdout=ports[protocol.PORT_STDOUT],
            stderr=ports[protocol.PORT_STDERR],
            console=console,
            x11=ports[protocol.PORT_X11] if x11 else None,
            exec=ports.get(protocol.PORT_EXEC),
        )

    def all(self) -> list[socket.socket]:
        return [s for s in (self.control, self.stdin, self.stdout, self.stderr, self.console, self.x11, self.exec) if s is not None]

    def close(self) -> None:
        for s in self.all():
            s.close()


class Guest(Protocol):
    """A started machine running the guest init."""

    channels: Channels
    # False for a backend whose ports cannot be half-closed (libvirt's
    # streams): the relay then tells the guest where stdin ends.
    half_close: bool

    @property
    def end_fd(self) -> int:
        """Readable once the machine has ended (its process is gone)."""
        ...

    def reap(self) -> int | None:
        """Its exit status, once it has ended (None while it runs)."""
        ...

    def booted(self) -> None:
        """The guest init reported in: what only the boot needed can go."""
        ...

    @property
    def holds_spec(self) -> bool:
        """Send the spec only after `ready()`: the backend snapshots the guest before any run data enters."""
        ...

    def ready(self) -> bytes | None:
        """The guest init waits for its spec, nothing of the run in it yet (a backend may snapshot it now).

        Returns a control message for the guest, after which it says
        "ready" again; None when the spec may go.
        """
        ...

    def stop(self, soft_timeout: float = 1.0) -> int:
        """A polite stop, then a forced one after `soft_timeout` seconds."""
        ...

    def kill(self) -> None:
        """The forced stop, at once."""
        ...

    def host_identity(self) -> tuple[str, str]:
        """The machine's name and security label on its host ("" for what this backend does not know)."""
        ...

    def finish(self) -> None:
        """The guest has said its last word (acked, synced, powering off): end the machine without waiting for it."""
        ...

    def pids(self) -> tuple[int, ...]:
        """Host processes that make up the machine (for `info` and memory)."""
        ...

    def peak_rss_kb(self) -> int | None:
        """The machine's peak resident memory so far, read while it runs."""
        ...

    def wait_built(self, timeout: float, attempt: int) -> None:
        """Return once the machine is built (raise BootStallError if it never gets there)."""
        ...

    def explain(self, fatal: str) -> str:
        """A hint to add to the guest's set-up failure when it is this backend's doing ("" if none)."""
        ...

    def failure(self, message: str) -> MachineError:
        """An error carrying what diagnoses this machine (command line, log tails)."""
        ...
