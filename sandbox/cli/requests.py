"""The run request a parsed command line makes (sandbox/plan/request.py has its types)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from sandbox.cli import config, options
from sandbox.net.request import parse_net
from sandbox.backends.libvirt import connect_uri
from sandbox.plan.request import CommandRequest, ConfinementOptions, FilesRequest, MachineRequest, RunRequest, X11Request, x11_size


def _present(ns: argparse.Namespace, table: tuple[options.Option, ...]) -> dict[str, Any]:
    """field -> value for the options of `table` this verb's parser has (`prepare` has no files options)."""
    return {o.target: o.value(ns) for o in table if hasattr(ns, o.dest)}


def _files(values: dict[str, Any]) -> FilesRequest:
    lists = {k: tuple(v) for k, v in values.items() if isinstance(v, list)}
    return FilesRequest(**{**values, **lists})


def from_namespace(ns: argparse.Namespace, argv: tuple[str, ...], cwd: str | None, closed_stdio: int, hostname: str = "") -> RunRequest:
    """The request a parsed `sandbox run` (or `prepare`) command line makes."""
    vm = options.values(ns, options.VM)
    vm["accel"] = config.accel(vm["accel"])
    workdir = vm.pop("workdir")
    net = parse_net(vm.pop("net"), vm.pop("mac"))
    connect = connect_uri(vm.pop("connect"), dict(os.environ))
    get = ns.__dict__.get
    return RunRequest(
        command=CommandRequest(argv, None, cwd, get("tty"), closed_stdio, get("timeout"), hostname, workdir),
        machine=MachineRequest(**vm),
        files=_files(_present(ns, options.FILES)),
        net=net,
        connect=connect,
        confinement=None if get("no_confine") else ConfinementOptions(**options.values(ns, options.CONFINEMENT)),
        x11=X11Request(str(get("x11")), x11_size(get("x11_size") or "1024x768")) if get("x11") else None,
        verbose=get("verbose") or 0,
        pool=get("pool") or 0,
        pool_idle=get("pool_idle") or 600.0,
    )
