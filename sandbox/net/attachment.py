"""One sandbox's network: what `--net` asks for, made real for one run."""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sandbox.core.errors import UsageError
from sandbox.wire.protocol import GuestNet
from sandbox.net import addresses
from sandbox.plan.request import NetRequest

# The guest waits this long for usable addresses before it gives up.
WAIT_MS = 10_000


@dataclass(frozen=True)
class Attachment:
    """What QEMU and the guest get: a netdev on a descriptor, and the interface's settings.

    `wait` returns once the host's side is wired up (the tap on its
    bridge, up), raising if that failed: the spec, and with it the
    guest's first packet, must not go before.
    """

    kind: str  # "tap" or "stream" (QEMU's -netdev type)
    fd: int
    guest: GuestNet
    wait: Callable[[], None] = lambda: None


class _Background:
    """Putting the tap on its bridge, off the start-up path.

    pyroute2's import alone takes ~0.3 s on a slow host: done in a thread,
    it overlaps QEMU's start and the restore (or boot) of the guest, which
    run in other processes.
    """

    def __init__(self, tap: str, bridge: str) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(tap, bridge), name="sandbox-tap", daemon=True)
        self.thread.start()

    def _run(self, tap: str, bridge: str) -> None:
        from sandbox.net import links

        try:
            with links.netlink() as ipr:
                if not links.is_bridge(ipr, bridge):
                    raise UsageError(f"--net bridge={bridge}: {bridge} is not a bridge")
                links.attach_to_bridge(ipr, tap, bridge)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self.error = exc

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def _mac(req: NetRequest) -> str:
    return req.mac or addresses.random_mac(os.urandom(3))


@contextlib.contextmanager
def attach(req: NetRequest, rundir: Path) -> Iterator[Attachment | None]:
    """Set up this run's network for as long as the run lasts (None for --net none)."""
    if req.mode == "none":
        yield None
    elif req.mode == "user":
        from sandbox.net import passt

        with passt.start(rundir, host=req.host) as p:
            dns = (passt.DNS,) if p.ipv4 else ()
            ipv4 = f"{passt.GUEST_IPV4}/{passt.PREFIX_LEN}" if p.ipv4 else None
            yield Attachment(
                "stream", p.fd, GuestNet(req.label, _mac(req), ipv4, passt.GATEWAY if p.ipv4 else None, int(p.ipv6), dns, (), WAIT_MS, passt.MTU)
            )
    elif req.mode == "nat":
        from sandbox.net import links, networks

        networks.require_root("--net nat")
        net = networks.get_or_create(req.name)
        networks.activate(net)
        fd, tap = links.open_tap()
        try:
            lease = networks.join(net, tap, _mac(req))
            try:
                wiring = _Background(tap, net.bridge)
                try:
                    guest = GuestNet(
                        req.label, lease.mac, f"{lease.ipv4}/{net.ipv4.prefixlen}", str(net.gateway4), 1, (str(net.gateway4),), (), WAIT_MS
                    )
                    yield Attachment("tap", fd, guest, wiring.wait)
                finally:
                    wiring.thread.join()
            finally:
                networks.leave(net, lease)
        finally:
            os.close(fd)
    else:  # bridge
        from sandbox.net import links

        if os.geteuid() != 0:
            raise UsageError("--net bridge needs root (it makes a tap); --net user works for anyone")
        if not links.exists(req.name):
            raise UsageError(f"--net bridge={req.name}: this host has no bridge {req.name}")
        fd, tap = links.open_tap()
        try:
            wiring = _Background(tap, req.name)
            try:
                # The LAN's own servers configure it: DHCP for IPv4, its routers' RAs for IPv6.
                yield Attachment("tap", fd, GuestNet(req.label, _mac(req), "dhcp", None, 2, (), (), WAIT_MS), wiring.wait)
            finally:
                wiring.thread.join()
        finally:
            os.close(fd)
