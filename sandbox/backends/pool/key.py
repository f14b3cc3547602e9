"""Which runs the pool can serve, and what its guests must have been made for (pure).

A pooled guest is restored from the warm-start template for one machine
shape, behind one set of walls, with no run-specific device: a run that
asks for anything else (another --memory, a network, a display, shares,
a keyboard, --connect, --cold, a kernel of its own, other walls) is
restored per run as before.  The key is what a request's guest depends
on, so that a pool made for one set of defaults never serves another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from sandbox.backends.pool import paths
from sandbox.core.errors import UsageError
from sandbox.plan.request import CommandRequest, ConfinementOptions, MachineRequest, RunRequest

FORMAT = 1  # bump when what a pooled guest is changes


def unpoolable(request: RunRequest) -> str | None:
    """Why the pool cannot serve `request` (None: it can)."""
    m, f = request.machine, request.files
    reasons = [
        (request.connect is not None, "--connect"),
        (not m.warm, "--cold"),
        (request.verbose >= 2, "-vv (a whole boot is shown)"),
        (request.net.mode != "none", "--net"),
        (request.x11 is not None, "--x11"),
        (m.keyboard, "--keyboard"),
        (bool(f.shares) or f.home is not None, "--share/--home (devices of their own)"),
    ]
    for applies, why in reasons:
        if applies:
            return why
    return None


def key(request: RunRequest) -> str:
    """What a pooled guest for `request` was made for: the machine and the walls (not the command), by this installation."""
    return hashlib.sha256(f"{FORMAT}\n{paths.install_id()}\n{describe(request)}".encode()).hexdigest()[:20]


def describe(request: RunRequest) -> str:
    """`request`'s machine and walls as JSON, for a pool process to make its guests from (request_from reads it)."""
    return json.dumps({"machine": asdict(request.machine),
                       "confinement": asdict(request.confinement) if request.confinement is not None else None},
                      sort_keys=True, default=str)  # fmt: skip


def request_from(text: str) -> RunRequest:
    """The request pool guests are made for (`true`, with the machine and walls of describe()'s JSON)."""
    try:
        blob = json.loads(text)
        machine = dict(blob["machine"])
        if machine.get("kernel") is not None:
            machine["kernel"] = Path(machine["kernel"])
        walls = blob["confinement"]
        return RunRequest(CommandRequest(("true",), tty=False), machine=MachineRequest(**machine),
                          confinement=ConfinementOptions(**walls) if walls is not None else None)  # fmt: skip
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--request: not what a pool is made for ({exc})") from None
