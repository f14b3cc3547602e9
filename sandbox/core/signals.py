"""The launcher's signal sets (a module of its own: the pooled client imports it and little else)."""

from __future__ import annotations

import signal
import threading

# Signals that end the launcher (held while a child is spawned, so that
# none lands between fork and knowing the child's pid).
TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Signals passed on to the guest command while it runs.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# Signals the entry point holds while it starts (sandbox/cli/launch.py).
HELD = FORWARDED
# Set while a run's relay passes FORWARDED on to the command (sandbox/run/relay.py):
# the pool's launcher holds the signals its user's process sends until then.
RELAYING = threading.Event()


def not_ignored(signals: tuple[signal.Signals, ...]) -> tuple[signal.Signals, ...]:
    """The ones of `signals` this process was not started ignoring.

    A launcher started under `nohup` (SIGHUP ignored), or in the background
    of a shell without job control (SIGINT, SIGQUIT), must not catch and
    pass on what its caller meant the command to be deaf to: run directly,
    the command would not have got it.
    """
    return tuple(s for s in signals if signal.getsignal(s) is not signal.SIG_IGN)
