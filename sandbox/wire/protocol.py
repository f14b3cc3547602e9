"""The host side of the guest init's protocol (see guest-init/protocol.h)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

PORT_CONTROL = 1
PORT_STDIN = 2
PORT_STDOUT = 3
PORT_STDERR = 4
PORT_X11 = 5
PORT_EXEC = 6

PORT_NAMES = {
    PORT_CONTROL: "sandbox.control",
    PORT_STDIN: "sandbox.stdin",
    PORT_STDOUT: "sandbox.stdout",
    PORT_STDERR: "sandbox.stderr",
    PORT_X11: "sandbox.x11",
    PORT_EXEC: "sandbox.exec",
}

ROOT_TAG = "root"  # the 9p mount tag of the host's root

# Multiplexed ports (X11, exec; sandbox/wire/mux.py): type, id (LE), length (LE), payload.
MUX_HEADER = struct.Struct("<cII")
MUX_HDR = MUX_HEADER.size
MUX_MAX_PAYLOAD = 256 * 1024  # the guest's buffer (BUFSZ): no frame is larger either way
X11_OPEN, X11_DATA, X11_CLOSE, X11_READY = b"O", b"D", b"C", b"R"
EXEC_START, EXEC_STDIN, EXEC_STDIN_EOF, EXEC_SIGNAL = b"S", b"I", b"i", b"K"
EXEC_STDOUT, EXEC_STDERR, EXEC_EXIT = b"O", b"R", b"X"
MAX_EXEC = 16  # processes the guest serves at once
HOSTNAME_MAX = 64  # Linux's limit, which sandbox names keep within

TTY_STDIN, TTY_STDOUT, TTY_STDERR = 1, 2, 4
# In the tty mask too: the launcher's stdin is a regular file, whose offset
# the launcher sets back after the run to where the command stopped reading.
TTY_STDIN_FILE = 8

# Why the guest could not start the command (ExecFailed.stage).
EXEC_STAGE_CREDS, EXEC_STAGE_CWD, EXEC_STAGE_EXEC, EXEC_STAGE_RLIMIT = 0, 1, 2, 3

# Mount steps of the guest's filesystem plan (sandbox/plan/mounts.py builds it).
MOP_OVERLAY = "O"
MOP_TMPFS = "T"
MOP_SHARE_RO = "R"
MOP_SHARE_RW = "W"
MOP_SHARE_COW = "C"
MOP_HOME = "h"
MOP_HIDE_DIR = "H"
MOP_HIDE_FILE = "F"
MOP_MKDIR = "D"
MOP_IMAGE = "I"  # an erofs image of the host's tree at path (tag: the image's host path), over the 9p one


@dataclass(frozen=True)
class MountStep:
    """One step of the guest's mount plan, done in order over the read-only root."""

    op: str
    path: str  # in the guest
    tag: str = ""  # 9p mount tag of a share; "u" on a tmpfs: owned by the user
    mode: int | None = None
    size: str = ""

    def encode(self) -> str:
        mode = f"{self.mode:o}" if self.mode is not None else ""
        return f"{self.op}:{self.tag}:{mode}:{self.size}:{self.path}"


@dataclass(frozen=True)
class GuestNet:
    """How the guest init configures its network interface (--net)."""

    mode: str  # for messages: "user", "nat=default", "bridge=br0"
    mac: str
    ipv4: str | None  # "10.0.2.15/24", "dhcp", or None (no IPv4)
    gateway4: str | None
    ipv6: int  # a SLAAC address and default route from an RA: 0 none, 1 required, 2 if offered
    dns: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    wait_ms: int = 10_000
    mtu: int = 0  # 0: the device's default

    def encode(self) -> str:
        return f"{self.mac} {self.ipv4 or '-'} {self.gateway4 or '-'} {self.ipv6} {self.wait_ms} {self.mtu} {self.mode}"


@dataclass(frozen=True)
class CommandSpec:
    """What the guest runs, and as whom."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    home: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    umask: int = 0o022
    tty: int = 0
    rows: int = 0
    cols: int = 0
    rlimits: tuple[tuple[int, int, int], ...] = ()  # (resource, soft, hard), -1 = unlimited
    mounts: tuple[MountStep, ...] = ()
    x11_display: int | None = None
    x11_xpra: bool = False  # --x11=xpra: the host dials in to an xpra server in the guest
    entropy: bytes = b""  # mixed into the guest's pool: clones of one template must differ
    realtime_ns: int = 0  # the host's wall clock when the spec was made (refined by "C")
    net: GuestNet | None = None
    closed: int = 0  # bit 1 << fd: the command's fd 0, 1 or 2 is closed, as the launcher's was
    hostname: str = ""  # the guest's host name, as containers get their name ("": left as the kernel has it)


def _field(key: str, value: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise ValueError(f"NUL byte in {key!r} value")
    return key.encode() + raw + b"\0"


def encode_spec(spec: CommandSpec) -> bytes:
    """The spec message: "SPEC <len>\\n" and NUL-terminated one-letter records."""
    parts = [_field("A", a) for a in spec.argv]
    parts += [_field("E", f"{k}={v}") for k, v in spec.env]
    parts += [
        _field("C", spec.cwd),
        _field("H", spec.home),
        _field("U", str(spec.uid)),
        _field("G", str(spec.gid)),
        _field("M", f"{spec.umask:o}"),
        _field("T", str(spec.tty)),
        _field("R", str(spec.rows)),
        _field("W", str(spec.cols)),
    ]
    parts += [_field("S", str(g)) for g in spec.groups]
    parts += [_field("Z", f"{r} {soft} {hard}") for r, soft, hard in spec.rlimits]
    parts += [_field("m", m.encode()) for m in spec.mounts]
    if spec.x11_display is not None:
        parts.append(_field("X", str(spec.x11_display)))
        if spec.x11_xpra:
            parts.append(_field("Y", "1"))
    if spec.entropy:
        parts.append(_field("r", spec.entropy.hex()))
    if spec.realtime_ns:
        parts.append(_field("t", str(spec.realtime_ns)))
    if spec.closed:
        parts.append(_field("F", str(spec.closed)))
    if spec.hostname:
        if len(spec.hostname.encode()) > HOSTNAME_MAX:
            raise ValueError(f"host name {spec.hostname!r} is longer than {HOSTNAME_MAX} bytes")
        parts.append(_field("N", spec.hostname))
    if spec.net is not None:
        parts.append(_field("n", spec.net.encode()))
        parts += [_field("d", d) for d in spec.net.dns]
        if spec.net.search:
            parts.append(_field("s", " ".join(spec.net.search)))
    body = b"".join(parts)
    return b"SPEC %d\n" % len(body) + body


@dataclass(frozen=True)
class Stamp:
    phase: str
    guest_ns: int


@dataclass(frozen=True)
class ExecFailed:
    code: int
    errno: int
    stage: int


@dataclass(frozen=True)
class LookedUp:
    """The command asked for a host name (which the network-less guest refused)."""

    name: str


@dataclass(frozen=True)
class OomKilled:
    count: int


@dataclass(frozen=True)
class Fatal:
    """The guest init could not set up the sandbox; the VM stops."""

    message: str


@dataclass(frozen=True)
class Finished:
    status: int
    out_bytes: int
    err_bytes: int
    stdin_taken: int = -1  # bytes of stdin the command read (TTY_STDIN_FILE), -1: not counted


@dataclass(frozen=True)
class LogLine:
    message: str


GuestMessage = Stamp | ExecFailed | Finished | LogLine | LookedUp | OomKilled | Fatal


# The init's phase stamps (guest-init/, stamp()): any other name is not ours.
GUEST_PHASES = frozenset(
    {"init_start", "tsc", "modules_loaded", "root_mounted", "ready", "prepped", "spec_read", "net_ready", "command_exec", "command_exit", "poweroff"}
)
MAX_LINE = 4096  # a control line from the guest is never longer (the init's are at most 1 KiB)
MAX_TEXT = 400  # characters of a guest's message shown to the user
_EXEC_STAGES = frozenset({EXEC_STAGE_CREDS, EXEC_STAGE_CWD, EXEC_STAGE_EXEC, EXEC_STAGE_RLIMIT})
_U64 = 1 << 64


def printable(text: str, limit: int = MAX_TEXT) -> str:
    """A guest's text made safe for the user's terminal: control characters escaped (as ps does), length bounded."""
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else "?" for c in text[: limit + 1])
    return out[:limit] + ("..." if len(text) > limit or len(out) > limit else "")


def _number(text: str, low: int = 0, high: int = _U64) -> int:
    if not (0 < len(text) <= 20 and (text.isdigit() or (text[0] == "-" and text[1:].isdigit()))):
        raise ValueError(f"not a number: {text[:24]!r}")
    value = int(text)
    if not low <= value < high:
        raise ValueError(f"out of range: {value}")
    return value


def parse_line(line: bytes) -> tuple[int, GuestMessage] | None:
    """(guest send time in ns, message) for one control line, or None if malformed.

    The guest is untrusted: every number is range-checked, phase names
    must be the init's, and text is made printable and bounded.
    """
    try:
        if len(line) > MAX_LINE:
            return None
        text = line.decode("utf-8", "replace").rstrip("\n")
        sent, kind, rest = (text.split(" ", 2) + ["", ""])[:3]
        when = _number(sent)
        if kind == "T":
            phase, ns = rest.split(" ")
            if phase not in GUEST_PHASES:
                return None
            return when, Stamp(phase, _number(ns))
        if kind == "X":
            code, err, stage = rest.split(" ")
            exec_stage = _number(stage)
            if exec_stage not in _EXEC_STAGES:
                return None
            return when, ExecFailed(_number(code, 125, 128), _number(err, 0, 4096), exec_stage)
        if kind == "N":
            return when, LookedUp(printable(rest, 255))
        if kind == "O":
            return when, OomKilled(_number(rest, 0, 1 << 31))
        if kind == "E":
            return when, Fatal(printable(rest))
        if kind == "S":
            status, out, err, *taken = rest.split(" ")
            if len(taken) > 1:
                return None
            return when, Finished(_number(status, 0, 256), _number(out, 0, 1 << 63), _number(err, 0, 1 << 63),
                                  _number(taken[0], -1, 1 << 63) if taken else -1)  # fmt: skip
        if kind == "L":
            return when, LogLine(printable(rest))
    except ValueError:
        return None
    return None


def signal_message(signo: int) -> bytes:
    return b"K %d\n" % signo


def winsize_message(rows: int, cols: int) -> bytes:
    return b"W %d %d\n" % (rows, cols)


def broken_pipe_message(fd: int) -> bytes:
    return b"P %d\n" % fd


def stdin_end_message(total: int) -> bytes:
    """stdin ends after `total` bytes: EOF for a port that cannot be half-closed."""
    return b"I %d\n" % total


def clock_message(realtime_ns: int) -> bytes:
    """The host's wall clock, the answer to the guest's "spec_read" stamp."""
    return b"C %d\n" % realtime_ns


ACK = b"A\n"
# Instead of a spec, to a guest about to be snapshotted: zero your free
# memory (so the template holds no stale pages), then stamp "ready" again.
ZERO_FREE_MEMORY = b"ZERO\n"
# Instead of a spec, to a guest restored for the pool (sandbox/backends/pool/):
# mount the host's root and run a few programs from it (so that QEMU has
# translated what every run does), then stamp "prepped" and wait for one.
PREPARE = b"PREP\n"


def premount_message(images: list[str]) -> bytes:
    """ "IMGS <len>\\n" and NUL-terminated image paths: a pooled guest mounts them ahead, for a run naming one to move it into place."""
    body = b"".join(_field("", p) for p in images)
    return b"IMGS %d\n" % len(body) + body
