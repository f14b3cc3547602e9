"""The `sandbox` command's entry point.

Its first act is to hold the signals a run passes on (SIGINT, SIGTERM,
SIGHUP, SIGQUIT), before it imports anything: a Ctrl-C in the first
milliseconds otherwise ends in a KeyboardInterrupt traceback from some
import, or a SIGTERM kills the launcher before it knows of a run.  Held
ones are noted and given, once a run can take them, to the pool's
launcher (handoff.py) or to the whole launcher here.  Signals the caller
started us ignoring (`nohup`) stay ignored.
"""

from __future__ import annotations

import signal


def main() -> int:
    """The `sandbox` command."""
    early: list[int] = []
    for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):  # core/signals.py's HELD, not imported yet
        if signal.getsignal(signo) is not signal.SIG_IGN:
            signal.signal(signo, lambda n, _frame: early.append(n))
    from sandbox.cli import handoff

    return handoff.main(early)
