"""The guest init's pure parts, run on the host: tests/init_units.c with guest-init/*.c (but main.c).

Built under AddressSanitizer and UndefinedBehaviorSanitizer where gcc has
them (every read past an input's end, every overflow aborts the binary).
The spec parser and the frame decoder take what the host's own encoders
(sandbox/wire/protocol.py, sandbox/wire/mux.py) make of generated values, and
must give those values back; cut, mutated and random inputs must never
crash them.  No VM.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO
from sandbox.wire import mux, protocol

SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
FLAGS = ["-std=gnu11", "-g", "-O1", "-Wall", "-Wextra", "-Werror"]
SETTINGS = settings(max_examples=120, deadline=None)


def _compile(out: Path, extra: list[str]) -> subprocess.CompletedProcess[str]:
    sources = [str(f) for f in sorted((REPO / "guest-init").glob("*.c")) if f.name != "main.c"]
    argv = ["cc", *FLAGS, *extra, f"-I{REPO / 'guest-init'}", "-o", str(out), str(REPO / "tests" / "init_units.c"), *sources]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("init-units") / "init_units"
    proc = _compile(out, SANITIZERS)
    if proc.returncode != 0:  # a gcc without libasan/libubsan: the checks still run, unguarded
        plain = _compile(out, [])
        assert plain.returncode == 0, plain.stderr
    yield out


def run(binary: Path, *args: str, data: bytes = b"") -> str:
    proc = subprocess.run([str(binary), *args], input=data, capture_output=True, timeout=60, check=False)
    # A sanitizer's report goes to stderr and ends the binary with a failure.
    assert proc.returncode == 0 and proc.stderr == b"", (proc.returncode, proc.stderr.decode(errors="replace")[-4000:])
    return proc.stdout.decode()


def test_the_fixed_cases_pass(unit: Path) -> None:
    out = run(unit, "selftest")
    assert out.startswith("passed ") and out.endswith(" checks, 0 failed\n"), out
    assert int(out.split()[1]) >= 190  # every check ran


# ---- the spec ----------------------------------------------------------------

text = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=12)
field = st.text(st.characters(exclude_characters="\0:", exclude_categories=["Cs"]), max_size=8)
mount_steps = st.builds(
    protocol.MountStep,
    op=st.sampled_from("OTRWChHFD"),
    path=text.map(lambda t: "/" + t),
    tag=field,
    mode=st.none() | st.integers(0, 0o7777),
    size=field,
)
nets = st.builds(
    protocol.GuestNet,
    mode=field.filter(lambda m: " " not in m),
    mac=st.just("02:00:00:00:00:01"),
    ipv4=st.sampled_from([None, "dhcp", "10.0.2.15/24"]),
    gateway4=st.sampled_from([None, "10.0.2.2"]),
    ipv6=st.integers(0, 2),
    dns=st.lists(field, max_size=3).map(tuple),
    search=st.lists(field.filter(lambda s: s and " " not in s), max_size=2).map(tuple),
)
specs = st.builds(
    protocol.CommandSpec,
    argv=st.lists(text, min_size=1, max_size=4).map(tuple),
    env=st.lists(st.tuples(field.filter(lambda k: "=" not in k), text), max_size=3).map(tuple),
    cwd=text,
    home=text,
    uid=st.integers(0, 2**32 - 2),
    gid=st.integers(0, 2**32 - 2),
    groups=st.lists(st.integers(0, 2**32 - 2), max_size=3).map(tuple),
    umask=st.integers(0, 0o777),
    tty=st.integers(0, 7),
    rows=st.integers(0, 65535),
    cols=st.integers(0, 65535),
    rlimits=st.lists(st.tuples(st.integers(0, 15), st.integers(-1, 2**62), st.integers(-1, 2**62)), max_size=3).map(tuple),
    mounts=st.lists(mount_steps, max_size=4).map(tuple),
    x11_display=st.none() | st.integers(0, 9999),
    x11_xpra=st.booleans(),
    entropy=st.binary(max_size=64),
    realtime_ns=st.integers(0, 2**62),
    net=st.none() | nets,
    closed=st.integers(0, 7),
    hostname=st.from_regex(r"[a-z0-9][a-z0-9-]{0,40}", fullmatch=True) | st.just(""),
)


def _hex(value: str) -> str:
    return value.encode("utf-8", "surrogateescape").hex()


def expected_spec(spec: protocol.CommandSpec) -> list[str]:
    """What `init_units spec` prints for the spec (the order of tests/init_units.c)."""
    lines = [f"A {_hex(a)}" for a in spec.argv] + [f"E {_hex(f'{k}={v}')}" for k, v in spec.env]
    lines += [f"C {_hex(spec.cwd)}", f"H {_hex(spec.home)}", f"ids {spec.uid} {spec.gid} {spec.umask:o}"]
    lines += [f"S {g}" for g in spec.groups]
    x11 = 0 if spec.x11_display is None else spec.x11_display + 1
    xpra = int(spec.x11_display is not None and spec.x11_xpra)
    rw = int(any(m.op == protocol.MOP_SHARE_RW for m in spec.mounts))
    lines += [f"tty {spec.tty} {spec.rows} {spec.cols} {spec.closed}", f"x11 {x11} {xpra}", f"rw {rw}", f"t {spec.realtime_ns}"]
    lines += [f"Z {r} {max(soft, -1)} {max(hard, -1)}" for r, soft, hard in spec.rlimits]
    lines += [f"m {ord(m.op):02x} {_hex(m.tag)} {0o755 if m.mode is None else m.mode:o} {_hex(m.size)} {_hex(m.path)}" for m in spec.mounts]
    lines.append(f"r {spec.entropy.hex().encode().hex() if spec.entropy else '-'}")
    lines.append(f"n {_hex(spec.net.encode()) if spec.net else '-'}")
    lines += [f"d {_hex(d)}" for d in (spec.net.dns if spec.net else ())]
    search = " ".join(spec.net.search) if spec.net else ""
    lines.append(f"s {_hex(search) if search else '-'}")
    lines.append(f"N {_hex(spec.hostname) if spec.hostname else '-'}")
    return lines


def spec_body(spec: protocol.CommandSpec) -> bytes:
    return protocol.encode_spec(spec).split(b"\n", 1)[1]


@SETTINGS
@given(spec=specs)
def test_the_spec_the_host_encodes_parses_back(unit: Path, spec: protocol.CommandSpec) -> None:
    assert run(unit, "spec", data=spec_body(spec)).splitlines() == expected_spec(spec)


@SETTINGS
@given(spec=specs, data=st.data())
def test_a_spec_cut_anywhere_is_refused_or_parsed_never_overrun(unit: Path, spec: protocol.CommandSpec, data: st.DataObject) -> None:
    body = spec_body(spec)
    cut = data.draw(st.integers(0, len(body)))
    first = run(unit, "spec", data=body[:cut]).splitlines()[0]
    if cut and body[cut - 1] != 0:
        assert first == "error bad spec: a record is not terminated"
    else:  # whole records: parsed, or refused for what they lack
        assert first.startswith("A ") or first == "error empty command", first


@SETTINGS
@given(spec=specs, flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6))
def test_a_mangled_spec_never_crashes_the_parser(unit: Path, spec: protocol.CommandSpec, flips: list[tuple[int, int]]) -> None:
    body = bytearray(spec_body(spec))
    for where, byte in flips:
        body[where % len(body)] = byte
    first = run(unit, "spec", data=bytes(body)).splitlines()[0]
    assert first.startswith(("A ", "error ")), first


@SETTINGS
@given(raw=st.binary(max_size=400))
def test_random_bytes_never_crash_the_spec_parser(unit: Path, raw: bytes) -> None:
    assert run(unit, "spec", data=raw).splitlines()[0].startswith(("A ", "error "))


def test_spec_numbers_out_of_range_are_refused(unit: Path) -> None:
    for record in (b"U-1", b"U4294967295", b"G1x", b"M0800", b"T16", b"R70000", b"X-1", b"S 1", b"t-5"):
        assert run(unit, "spec", data=b"Atrue\0" + record + b"\0") == "error bad number in the spec\n", record


# ---- the frame codec -------------------------------------------------------------

frames = st.lists(st.tuples(st.binary(min_size=1, max_size=1), st.integers(0, 2**32 - 1), st.binary(max_size=300)), max_size=8)
chunks = st.lists(st.integers(1, 700), min_size=1, max_size=5)


def decode_model(stream: bytes) -> tuple[list[str], bool, int]:
    """The frames in a stream, whether a frame was too long, and the bytes left over (a Python model of the decoder)."""
    out: list[str] = []
    off = 0
    while len(stream) - off >= protocol.MUX_HDR:
        kind, ident, length = protocol.MUX_HEADER.unpack_from(stream, off)
        if length > protocol.MUX_MAX_PAYLOAD:
            return out, True, len(stream) - off
        if len(stream) - off < protocol.MUX_HDR + length:
            break
        payload = stream[off + protocol.MUX_HDR : off + protocol.MUX_HDR + length]
        out.append(f"frame {kind.hex()} {ident} {length} {payload.hex()}")
        off += protocol.MUX_HDR + length
    return out, False, len(stream) - off


def decoded(unit: Path, stream: bytes, sizes: list[int]) -> tuple[list[str], bool, int]:
    lines = run(unit, "frames", *map(str, sizes), data=stream).splitlines()
    rest = lines.pop()
    assert rest.startswith("rest "), rest
    error = bool(lines) and lines[-1] == "error"
    return lines[:-1] if error else lines, error, int(rest.split()[1])


@SETTINGS
@given(sent=frames, sizes=chunks, cut=st.integers(0, 20))
def test_frames_the_host_encodes_come_out_whole_in_any_chunks(unit: Path, sent: list[tuple[bytes, int, bytes]], sizes: list[int], cut: int) -> None:
    stream = b"".join(mux.encode(kind, ident, payload) for kind, ident, payload in sent)
    stream = stream[: len(stream) - cut] if cut <= len(stream) else stream
    got, error, rest = decoded(unit, stream, sizes)
    assert (got, error, rest) == decode_model(stream)
    if cut == 0:
        assert got == [f"frame {k.hex()} {i} {len(p)} {p.hex()}" for k, i, p in sent] and rest == 0


@SETTINGS
@given(sent=frames, length=st.integers(protocol.MUX_MAX_PAYLOAD + 1, 2**32 - 1), sizes=chunks)
def test_a_frame_longer_than_the_limit_is_an_error_after_those_before_it(unit: Path, sent: list[tuple[bytes, int, bytes]], length: int, sizes: list[int]) -> None:
    good = b"".join(mux.encode(kind, ident, payload) for kind, ident, payload in sent)
    got, error, _ = decoded(unit, good + protocol.MUX_HEADER.pack(b"D", 1, length) + b"x" * 50, sizes)
    assert error and got == [f"frame {k.hex()} {i} {len(p)} {p.hex()}" for k, i, p in sent]


def test_the_largest_frame_passes_whole(unit: Path) -> None:
    payload = bytes(range(256)) * (protocol.MUX_MAX_PAYLOAD // 256)
    got, error, rest = decoded(unit, mux.encode(b"D", 5, payload) + mux.encode(b"C", 5), [65536])
    assert not error and rest == 0 and got == [f"frame 44 5 {len(payload)} {payload.hex()}", "frame 43 5 0 "]


@SETTINGS
@given(raw=st.binary(max_size=2000), sizes=chunks)
def test_random_streams_decode_as_the_model_says(unit: Path, raw: bytes, sizes: list[int]) -> None:
    got, error, rest = decoded(unit, raw, sizes)
    model, model_error, model_rest = decode_model(raw)
    assert (got, error) == (model, model_error)
    if not error:
        assert rest == model_rest


# ---- DHCP ----------------------------------------------------------------------

HW = bytes.fromhex("02000000000a")
OPTIONS_AT = 240  # offsetof(struct dhcp_msg, options)
MSG_SIZE = OPTIONS_AT + 312


def lease_model(msg: bytes, xid: int) -> list[str]:
    """What dhcp_parse makes of a reply (RFC 2131's layout, as the init reads it)."""
    if not OPTIONS_AT <= len(msg) <= MSG_SIZE or msg[0] != 2 or msg[4:8] != struct.pack("<I", xid) or msg[28:34] != HW:
        return ["type 0"]
    kind, server, mask, router, dns = 0, b"\0" * 4, b"\0" * 4, b"\0" * 4, []
    o = OPTIONS_AT
    while o < len(msg) and msg[o] != 255:
        if msg[o] == 0:
            o += 1
            continue
        if len(msg) - o < 2 or len(msg) - o - 2 < msg[o + 1]:
            break
        code, value = msg[o], msg[o + 2 : o + 2 + msg[o + 1]]
        if code == 53 and len(value) == 1:
            kind = value[0]
        elif code == 54 and len(value) == 4:
            server = value
        elif code == 1 and len(value) == 4:
            mask = value
        elif code == 3 and len(value) >= 4:
            router = value[:4]
        elif code == 6:
            dns += [socket.inet_ntoa(value[i : i + 4]) for i in range(0, len(value) - 3, 4)]
            dns = dns[:3]
        o += 2 + msg[o + 1]
    if not kind:
        return ["type 0"]
    fields = " ".join(b.hex() for b in (msg[16:20], server, mask, router))
    return [f"type {kind}", f"lease {fields}" + "".join(f" {d}" for d in dns)]


options = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([1, 3, 6, 53, 54, 51, 12]), st.binary(max_size=17)).map(lambda t: bytes([t[0], len(t[1])]) + t[1]),
        st.just(b"\0"),
        st.binary(min_size=1, max_size=3),  # junk, or an option cut off
    ),
    max_size=8,
).map(b"".join)


@SETTINGS
@given(
    xid=st.integers(0, 2**32 - 1),
    ours=st.booleans(),
    op=st.sampled_from([2, 2, 2, 1]),
    yiaddr=st.binary(min_size=4, max_size=4),
    opts=options,
    end=st.booleans(),
    cut=st.integers(0, 260),
)
def test_dhcp_replies_parse_as_the_model_says(unit: Path, xid: int, ours: bool, op: int, yiaddr: bytes, opts: bytes, end: bool, cut: int) -> None:
    head = bytes([op, 1, 6, 0]) + struct.pack("<I", xid if ours else xid ^ 1) + bytes(8) + yiaddr + bytes(8)
    msg = head + (HW + bytes(10)) + bytes(192) + bytes([99, 130, 83, 99]) + opts + (b"\xff" if end else b"")
    msg = msg[: max(len(msg) - cut, 0)][:MSG_SIZE]
    assert run(unit, "dhcp", str(xid), HW.hex(), data=msg).splitlines() == lease_model(msg, xid)


@SETTINGS
@given(raw=st.binary(max_size=MSG_SIZE))
def test_random_bytes_never_crash_the_dhcp_parser(unit: Path, raw: bytes) -> None:
    assert run(unit, "dhcp", "0", HW.hex(), data=raw).splitlines() == lease_model(raw, 0)


# ---- the refusing resolver ---------------------------------------------------------

# A few labels, or (longer than the init's 255-byte buffer once written out) many short ones in a datagram of 512.
labels = st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=5) | st.lists(
    st.binary(min_size=1, max_size=3), min_size=60, max_size=160
).filter(lambda names: sum(len(n) + 1 for n in names) <= 512 - 12 - 5)


def shown(label: bytes) -> str:
    return "".join(chr(c) if chr(c).isascii() and (chr(c).isalnum() or chr(c) in "-_") else "?" for c in label)


@SETTINGS
@given(ident=st.binary(min_size=2, max_size=2), flags=st.integers(0, 255), names=labels, tail=st.binary(max_size=8))
def test_a_query_is_refused_and_its_name_told(unit: Path, ident: bytes, flags: int, names: list[bytes], tail: bytes) -> None:
    question = b"".join(bytes([len(n)]) + n for n in names) + b"\0" + b"\0\1\0\1"
    query = ident + bytes([flags, 0]) + b"\0\1\0\0\0\0\0\0" + question + tail
    answer, name = run(unit, "dns", data=query).splitlines()
    reply = bytes.fromhex(answer.split(" ", 1)[1])
    assert reply[:2] == ident and reply[2] == (flags & 0x79) | 0x80 and reply[3] == 0x85  # a response, REFUSED
    assert reply[4:12] == b"\0\1" + bytes(6) and reply[12:] == question  # the question echoed, nothing else
    assert bytes.fromhex(name.split(" ", 1)[1]).decode() == ".".join(shown(n) for n in names)[:254]


@SETTINGS
@given(raw=st.binary(max_size=512))
def test_random_datagrams_never_crash_the_resolver(unit: Path, raw: bytes) -> None:
    answer, name = run(unit, "dns", data=raw).splitlines()
    reply = bytes.fromhex(answer.split(" ", 1)[1])
    assert len(reply) == 0 if len(raw) < 12 else 12 <= len(reply) <= len(raw)
    assert len(bytes.fromhex(name.split(" ", 1)[1])) <= 254
    if reply:
        assert reply[3] == 0x85
