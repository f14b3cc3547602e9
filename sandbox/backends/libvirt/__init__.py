"""The libvirt backend (--connect URI): the same guest, spec, protocol and relay, run by libvirtd.

Only this module is imported on a run without --connect: the backend's
own modules (and libvirt's binding) cost ~30 ms to import.
"""

from __future__ import annotations


def connect_uri(option: str | None, env: dict[str, str]) -> str | None:
    """--connect, else SANDBOX_CONNECT; None for the direct backend (also `--connect ''`, whatever the defaults say)."""
    return (option if option is not None else env.get("SANDBOX_CONNECT")) or None
