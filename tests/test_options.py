"""Each option declared once: parsed, handed on, and forwarded by `sandbox bench` from one table."""

from __future__ import annotations

import argparse
from dataclasses import fields

from sandbox import options
from sandbox.confinement.walls import ConfinementOptions
from sandbox.runner import RunOptions


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
    run_fields = {f.name for f in fields(RunOptions)}
    assert {o.target for o in options.VM} <= run_fields
    assert {o.target for o in options.CONFINEMENT} == {f.name for f in fields(ConfinementOptions)}
    ConfinementOptions(**options.values(parse(options.CONFINEMENT, []), options.CONFINEMENT))
