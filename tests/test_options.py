"""Each option declared once: parsed, handed on, and forwarded by `sandbox bench` from one table."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from sandbox.cli import options
from sandbox.core import sizes
from sandbox.plan.request import ConfinementOptions, FilesRequest, MachineRequest, RunRequest


def parse(table: tuple[options.Option, ...], argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    options.add(p, table)
    return p.parse_args(argv)


def test_forwarded_arguments_reproduce_the_values() -> None:
    argv = ["--memory", "1G", "--cpus", "1", "--no-pvh", "--kernel-append", "quiet=1", "--tb-size", "48", "--tracefs"]
    vals = options.values(parse(options.VM, argv), options.VM)
    assert vals["memory_mb"] == 1024 and vals["pvh"] is False and vals["tracefs"] is True
    forwarded = options.forward(options.VM, vals)
    assert options.values(parse(options.VM, forwarded), options.VM) == vals
    assert "--cpus" not in forwarded  # a default is left out


def test_every_option_fills_a_field_of_its_target() -> None:
    # The VM table fills the machine request, but for the network, --connect and --workdir, which the request holds itself.
    assert {o.target for o in options.VM} == {f.name for f in fields(MachineRequest)} | {"net", "mac", "connect", "workdir"}
    assert {o.target for o in options.FILES} == {f.name for f in fields(FilesRequest)}
    assert {o.target for o in options.CONFINEMENT} == {f.name for f in fields(ConfinementOptions)}
    assert {"net", "connect", "confinement", "x11"} <= {f.name for f in fields(RunRequest)}
    ConfinementOptions(**options.values(parse(options.CONFINEMENT, []), options.CONFINEMENT))


@pytest.mark.parametrize("text, mb", [("512M", 512), ("2G", 2048), ("1.5G", 1536), ("4096K", 4), ("768", 768), ("1GiB", 1024), ("64mb", 64)])
def test_sizes_are_read_one_way(text: str, mb: int) -> None:
    assert sizes.parse_mb(text) == mb
    assert options.size_mb(text, minimum=1) == mb


@pytest.mark.parametrize("text", ["50M", "64M", "95M"])
def test_guest_memory_below_the_minimum_gets_one_message(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=rf"'{text}' is too small: the guest kernel needs 96M at least"):
        options.guest_memory(text)


def test_bad_sizes_are_named() -> None:
    for text in ("lots", "1.2.3G", "-5M", "5X"):
        assert sizes.parse_bytes(text) is None
        with pytest.raises(argparse.ArgumentTypeError, match="bad size"):
            options.guest_memory(text)
