"""--net and --mac as a run asks for them: parsed once, when the command line is read."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

MODES = ("none", "user", "nat", "bridge")


@dataclass(frozen=True)
class NetRequest:
    """--net MODE[=NAME] and --mac."""

    mode: str = "none"
    name: str = ""  # nat: the network; bridge: the host's bridge
    mac: str | None = None
    host: bool = False  # user,host: the host's own services are reachable too

    @property
    def label(self) -> str:
        if self.host:
            return f"{self.mode},host"
        return f"{self.mode}={self.name}" if self.name else self.mode

    @property
    def nic_kind(self) -> str | None:
        """QEMU's -netdev type for this mode: passt's socket, or a tap."""
        return {"none": None, "user": "stream"}.get(self.mode, "tap")


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
        from .networks import DEFAULT, check_name

        name = check_name(name or DEFAULT)
    if mac is not None:
        if mode == "none":
            raise UsageError("--mac needs a network (--net user, nat or bridge)")
        from . import addresses

        mac = addresses.parse_mac(mac)
    return NetRequest(mode, name, mac, host)
