"""--net and --mac, parsed once when the command line is read (into plan.request.NetRequest)."""

from __future__ import annotations

import re
from sandbox.core.errors import UsageError
from sandbox.plan.request import NetRequest

MODES = ("none", "user", "nat", "bridge")


def parse_net(value: str, mac: str | None = None) -> NetRequest:
    """--net's value: none, user, user,host, nat, nat=NAME or bridge=BRIDGE (with --mac)."""
    if value == "none" and mac is None:
        return NetRequest()  # the usual case, with nothing of sandbox.net imported
    host = value == "user,host"
    mode, _, name = ("user", "", "") if host else value.partition("=")
    if mode not in MODES:
        raise UsageError(f"--net {value}: not one of none, user, user,host, nat[=NAME], bridge=BRIDGE")
    if mode in ("none", "user") and name:
        raise UsageError(f"--net {value}: {mode} takes no name")
    if mode == "bridge" and not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", name):
        raise UsageError(f"--net {value}: bridge= needs the name of one of this host's bridges")
    if mode == "nat":
        from sandbox.net.networks import DEFAULT, check_name

        name = check_name(name or DEFAULT)
    if mac is not None:
        if mode == "none":
            raise UsageError("--mac needs a network (--net user, nat or bridge)")
        from sandbox.net import addresses

        mac = addresses.parse_mac(mac)
    return NetRequest(mode, name, mac, host)
