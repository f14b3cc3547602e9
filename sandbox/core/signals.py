"""The launcher's signal sets (a module of its own: the pooled client imports it and little else)."""

from __future__ import annotations

import signal

# Signals that end the launcher (held while a child is spawned, so that
# none lands between fork and knowing the child's pid).
TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Signals passed on to the guest command while it runs.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
