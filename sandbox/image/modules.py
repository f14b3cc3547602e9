"""Kernel module resolution through modules.dep, in load order."""

from __future__ import annotations

import gzip
import lzma
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from sandbox.core.errors import InitramfsError


@dataclass(frozen=True)
class Module:
    name: str  # canonical, with underscores
    path: str  # relative to the modules directory, as in modules.dep


def canonical(name: str) -> str:
    return name.replace("-", "_")


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return canonical(re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base))


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (path, dependency names) from the text of modules.dep."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        table[module_name(path)] = (path.strip(), [module_name(d) for d in deps.split()])
    return table


def parse_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def resolve(
    wanted: list[str], deps: dict[str, tuple[str, list[str]]], builtin: frozenset[str] | set[str] = frozenset()
) -> list[Module]:
    """The modules to load for `wanted`, every dependency before its users.

    Built-in modules need no loading. A wanted module that is neither a
    module nor built in is an error naming it.
    """
    order: list[Module] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = canonical(name)
        if name in seen or name in builtin:
            return
        if name in chain:
            raise InitramfsError(f"module dependency loop: {' -> '.join(chain + (name,))}")
        if name not in deps:
            raise InitramfsError(f"kernel module {name} not found in modules.dep")
        path, requires = deps[name]
        for dep in requires:
            visit(dep, chain + (name,))
        seen.add(name)
        order.append(Module(name, path))

    for name in wanted:
        visit(name, ())
    return order


def resolve_in(modules_dir: Path, wanted: list[str]) -> list[Module]:
    """resolve() against an installed module tree."""
    try:
        deps = parse_modules_dep((modules_dir / "modules.dep").read_text())
    except OSError as exc:
        raise InitramfsError(f"cannot read {modules_dir}/modules.dep: {exc.strerror}") from exc
    try:
        builtin = parse_builtin((modules_dir / "modules.builtin").read_text())
    except OSError:
        builtin = set()
    return resolve(wanted, deps, builtin)


SIGNATURE_MAGIC = b"~Module signature appended~\n"
_SIG_INFO = struct.Struct(">BBBBBxxxI")  # algo, hash, id type, signer len, key id len, pad, sig len


def strip_signature(data: bytes) -> bytes:
    """The module without its appended signature (unchanged if it has none).

    The guest would check each signature in software under TCG (~40 ms for
    the six modules).  It proves nothing here: the modules come from the
    host's own module tree, and whoever could swap them in the cache could
    as well choose the guest kernel's command line.  The guest kernel notes
    unsigned modules as a taint (E) and says so once in its log.
    """
    if not data.endswith(SIGNATURE_MAGIC) or len(data) < len(SIGNATURE_MAGIC) + _SIG_INFO.size:
        return data
    end = len(data) - len(SIGNATURE_MAGIC)
    _algo, _hash, _idtype, signer_len, key_id_len, sig_len = _SIG_INFO.unpack_from(data, end - _SIG_INFO.size)
    size = end - _SIG_INFO.size - sig_len - signer_len - key_id_len
    if size <= 0:
        raise InitramfsError("malformed module signature")
    return data[:size]


def read_module(modules_dir: Path, module: Module) -> bytes:
    """The module's ELF bytes, decompressed when stored compressed."""
    data = (modules_dir / module.path).read_bytes()
    if module.path.endswith(".xz"):
        return lzma.decompress(data)
    if module.path.endswith(".gz"):
        return gzip.decompress(data)
    if module.path.endswith(".zst"):
        import zstandard  # only here: most kernels' modules are plain or xz

        out: bytes = zstandard.ZstdDecompressor().decompress(data, max_output_size=64 << 20)
        return out
    return data
