"""sVirt MCS labels: a unique category pair per live sandbox, reserved host-wide.

Each pair is a host-wide reservation (reservations.py): a crashed
launcher's pair is reclaimed by the next allocation that tries it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from sandbox.core.errors import ConfinementError
from sandbox.confinement import reservations

CATEGORIES = 1024  # c0..c1023, as libvirt uses


@dataclass(frozen=True)
class Context:
    """An SELinux security context user:role:type:level."""

    user: str
    role: str
    type: str
    level: str

    def __str__(self) -> str:
        return f"{self.user}:{self.role}:{self.type}:{self.level}"

    @classmethod
    def parse(cls, text: str) -> Context:
        parts = text.split(":", 3)
        if len(parts) != 4 or not all(parts):
            raise ConfinementError(f"bad SELinux context {text!r} (want user:role:type:level)")
        return cls(*parts)


def mcs_level(a: int, b: int) -> str:
    """The MCS level for a category pair, lowest first as SELinux prints it."""
    if a == b or not (0 <= a < CATEGORIES and 0 <= b < CATEGORIES):
        raise ValueError(f"bad category pair {a},{b}")
    lo, hi = sorted((a, b))
    return f"s0:c{lo},c{hi}"


def sandbox_contexts(pair: tuple[int, int], domain: str = "svirt_t", image: str = "svirt_image_t") -> tuple[Context, Context]:
    """(process context, file context) for a category pair, as libvirt's sVirt builds them."""
    level = mcs_level(*pair)
    return Context("system_u", "system_r", domain, level), Context("system_u", "object_r", image, level)


@dataclass
class Reservation:
    """A held category pair; `release()` (or process death) frees it."""

    pair: tuple[int, int]
    held: reservations.Reservation

    def release(self) -> None:
        self.held.release()


def _name(pair: tuple[int, int]) -> str:
    return f"c{pair[0]},c{pair[1]}"


def reserve(directory: Path, rng: random.Random | None = None, categories: int = CATEGORIES, attempts: int = 10000) -> Reservation:
    """Reserve a random unused pair (A < B) of categories in [0, categories)."""

    def draw(r: random.Random) -> str:
        a, b = sorted(r.sample(range(categories), 2))
        return _name((a, b))

    held = reservations.reserve_random(directory, draw, "MCS category pair", attempts, rng)
    a, b = (int(c.lstrip("c")) for c in held.name.split(","))
    return Reservation((a, b), held)


def reserve_static(directory: Path, pair: tuple[int, int]) -> Reservation:
    """Reserve a given pair; fails if a live sandbox holds it."""
    lo, hi = sorted(pair)
    held = reservations.try_reserve(directory, _name((lo, hi)))
    if held is None:
        raise ConfinementError(f"MCS pair c{pair[0]},c{pair[1]} is in use by another sandbox")
    return Reservation((lo, hi), held)
