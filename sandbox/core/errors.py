"""One exception hierarchy; the CLI maps each class to an exit status."""

from __future__ import annotations

# Exit statuses shared with timeout(1) and POSIX shells.
EXIT_TIMEOUT = 124
EXIT_LAUNCHER = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


class SandboxError(Exception):
    """A failure of the sandbox itself (not of the command it runs)."""

    exit_status = EXIT_LAUNCHER


class UsageError(SandboxError):
    """Bad command-line input (the launcher's status: a command's own could be 2)."""


class KernelError(SandboxError):
    """No usable guest kernel, or a kernel that lacks what we need."""


class ToolMissingError(SandboxError):
    """A host program or package we depend on is absent."""


class InitramfsError(SandboxError):
    """The initramfs or guest init could not be built."""


class ConfinementError(SandboxError):
    """A requested confinement wall could not be put up."""


class MachineError(SandboxError):
    """QEMU failed, or the guest died or stalled before reporting a status.

    Carries the QEMU command line and the tail of the guest console so that
    the failure can be diagnosed from the message alone.
    """

    def __init__(self, message: str, argv: list[str] | None = None, log_tail: str = "") -> None:
        super().__init__(message)
        self.argv = argv or []
        self.log_tail = log_tail


class GuestProtocolError(SandboxError):
    """The guest broke the host/guest protocol (a hostile or broken guest): the run ends."""


class BootStallError(MachineError):
    """The guest made no progress within the boot bound."""


class TimeoutExpired(SandboxError):
    """The user's --timeout ran out; the VM was killed."""

    exit_status = EXIT_TIMEOUT


class Interrupted(SandboxError):
    """A terminating signal arrived before the guest command ran (or after it ended)."""

    def __init__(self, signo: int) -> None:
        import signal

        super().__init__(f"interrupted by {signal.Signals(signo).name}")
        self.exit_status = 128 + signo
