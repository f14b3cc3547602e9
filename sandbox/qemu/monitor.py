"""QEMU's monitor (QMP) over an inherited socket, driven synchronously with every call bounded."""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import SandboxError
from ..process import TERMINATING

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger(__name__)



class Monitor:
    """One QMP session on `sock`, through qemu.qmp's client.

    qemu.qmp's synchronous wrapper waits for the greeting and capabilities
    reply without a bound, and a QEMU stuck before its main loop sends the
    greeting but never the reply; here each step has a timeout.
    """

    def __init__(self, sock: socket.socket) -> None:
        # Imported here, not at start-up: asyncio alone costs the launcher
        # 15 ms, and by now QEMU is starting in parallel.
        import asyncio

        from qemu.qmp import QMPClient

        self.sock = sock
        self.loop: asyncio.AbstractEventLoop = asyncio.new_event_loop()
        self.client = QMPClient("sandbox")
        self.connected = False

    def _run(self, coro: Any, timeout: float) -> Any:
        """Run `coro` to completion or timeout; a terminating signal cancels it and is then re-raised.

        A Python signal handler that raises inside the event loop's
        callbacks is swallowed by asyncio (seen: a SIGTERM during start-up
        was lost); so the loop catches those signals itself, and they are
        delivered again to whatever handler was there once the loop is out
        of the way.
        """
        import asyncio

        task = self.loop.create_task(asyncio.wait_for(coro, timeout))
        caught: list[int] = []

        def on_signal(signo: int) -> None:
            caught.append(signo)
            task.cancel()

        saved = {s: signal.getsignal(s) for s in TERMINATING}
        wakeup = signal.set_wakeup_fd(-1)  # the relay's, if it runs: the loop sets its own
        signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)
        for s in TERMINATING:
            self.loop.add_signal_handler(s, on_signal, s)
        try:
            return self.loop.run_until_complete(task)
        finally:
            for s, handler in saved.items():
                self.loop.remove_signal_handler(s)
                signal.signal(s, handler)
            signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)
            if caught:
                signal.raise_signal(caught[0])

    def connect(self, timeout: float) -> bool:
        """Greeting and capabilities negotiation; False if QEMU did not answer in time or went away."""
        try:
            self._run(self.client.connect(self.sock), timeout)
        except (SandboxError, KeyboardInterrupt):
            raise  # a signal's own exception: the run ends
        except Exception as exc:  # noqa: BLE001 - timeout, EOF or a protocol error all mean "not running"
            log.debug("QMP negotiation failed: %s", exc)
            return False
        self.connected = True
        return True

    def execute(self, command: str, timeout: float, arguments: Mapping[str, object] | None = None) -> Any:
        """Run a QMP command; raises on error or timeout."""
        if not self.connected and not self.connect(timeout):
            raise ConnectionError("QEMU's monitor does not answer")
        return self._run(self.client.execute(command, arguments), timeout)

    def send_fd(self, fd: int, name: str, timeout: float) -> None:
        """Hand QEMU a descriptor (SCM_RIGHTS), known to it from now on as `name`."""
        if not self.connected and not self.connect(timeout):
            raise ConnectionError("QEMU's monitor does not answer")
        self.client.send_fd_scm(fd)
        self._run(self.client.execute("getfd", {"fdname": name}), timeout)

    def close(self) -> None:
        try:
            if self.connected:
                self._run(self.client.disconnect(), 1.0)
        except (SandboxError, KeyboardInterrupt):
            raise  # a signal's own exception, re-delivered by _run
        except Exception as exc:  # noqa: BLE001 - QEMU is gone; nothing left to tell it
            log.debug("closing QMP: %s", exc)
        finally:
            self.loop.close()
