import re
from pathlib import Path

import pytest

from sandbox.wire import protocol
from sandbox.wire.protocol import CommandSpec


def decode(msg: bytes) -> tuple[int, list[tuple[str, str]]]:
    header, _, body = msg.partition(b"\n")
    length = int(header.split()[1])
    assert len(body) == length
    records = body.split(b"\0")[:-1]
    return length, [(r[:1].decode(), r[1:].decode()) for r in records]


def test_spec_records_survive_spaces_quotes_and_newlines() -> None:
    spec = CommandSpec(
        argv=("sh", "-c", 'echo "a b"\nnext'),
        env=(("X", "1\n2 '3'"), ("EMPTY", "")),
        cwd="/dir with space",
        home="/root",
        uid=1000,
        gid=100,
        groups=(27, 44),
        umask=0o027,
        tty=3,
        rows=24,
        cols=80,
    )
    _, records = decode(protocol.encode_spec(spec))
    assert [v for k, v in records if k == "A"] == ["sh", "-c", 'echo "a b"\nnext']
    assert [v for k, v in records if k == "E"] == ["X=1\n2 '3'", "EMPTY="]
    assert dict((k, v) for k, v in records if k not in "AES") == {
        "C": "/dir with space", "H": "/root", "U": "1000", "G": "100", "M": "27",
        "T": "3", "R": "24", "W": "80",
    }  # fmt: skip
    assert [v for k, v in records if k == "S"] == ["27", "44"]


def test_nul_in_a_value_is_refused() -> None:
    spec = CommandSpec(argv=("a\0b",), env=(), cwd="/", home="/", uid=0, gid=0)
    try:
        protocol.encode_spec(spec)
    except ValueError as exc:
        assert "NUL" in str(exc)
    else:
        raise AssertionError("NUL accepted")


def test_guest_lines_parse() -> None:
    assert protocol.parse_line(b"5 T init_start 4") == (5, protocol.Stamp("init_start", 4))
    assert protocol.parse_line(b"6 X 127 2 2") == (6, protocol.ExecFailed(127, 2, protocol.EXEC_STAGE_EXEC))
    assert protocol.parse_line(b"6 N example.com") == (6, protocol.LookedUp("example.com"))
    assert protocol.parse_line(b"6 O 2") == (6, protocol.OomKilled(2))
    assert protocol.parse_line(b"6 E mount 9p on /x: No such device") == (6, protocol.Fatal("mount 9p on /x: No such device"))
    assert protocol.parse_line(b"7 S 42 10 0") == (7, protocol.Finished(42, 10, 0))
    assert protocol.parse_line(b"8 L init: oops") == (8, protocol.LogLine("init: oops"))
    assert protocol.parse_line(b"garbage") is None
    assert protocol.parse_line(b"9 S x y z") is None


def test_host_messages() -> None:
    assert protocol.signal_message(2) == b"K 2\n"
    assert protocol.winsize_message(24, 80) == b"W 24 80\n"
    assert protocol.broken_pipe_message(1) == b"P 1\n"


def test_x11_display_and_xpra_mode_records() -> None:
    base = dict(argv=("xterm",), env=(), cwd="/", home="/root", uid=0, gid=0)
    _, records = decode(protocol.encode_spec(CommandSpec(**base, x11_display=0)))  # type: ignore[arg-type]
    assert ("X", "0") in records and not any(k == "Y" for k, _ in records)
    _, records = decode(protocol.encode_spec(CommandSpec(**base, x11_display=100, x11_xpra=True)))  # type: ignore[arg-type]
    assert ("X", "100") in records and ("Y", "1") in records


def test_closed_fd_record_only_when_a_fd_was_closed() -> None:
    base = dict(argv=("true",), env=(), cwd="/", home="/root", uid=0, gid=0)
    _, records = decode(protocol.encode_spec(CommandSpec(**base)))  # type: ignore[arg-type]
    assert not any(k == "F" for k, _ in records)
    _, records = decode(protocol.encode_spec(CommandSpec(**base, closed=0b101)))  # type: ignore[arg-type]
    assert ("F", "5") in records


def test_hostname_record_only_when_named() -> None:
    base = dict(argv=("hostname",), env=(), cwd="/", home="/root", uid=0, gid=0)
    _, records = decode(protocol.encode_spec(CommandSpec(**base)))  # type: ignore[arg-type]
    assert not any(k == "N" for k, _ in records)
    _, records = decode(protocol.encode_spec(CommandSpec(**base, hostname="web")))  # type: ignore[arg-type]
    assert ("N", "web") in records
    try:
        protocol.encode_spec(CommandSpec(**base, hostname="x" * 65))  # type: ignore[arg-type]
    except ValueError as exc:
        assert "longer than 64 bytes" in str(exc)
    else:
        raise AssertionError("a 65-byte host name accepted")


def test_exec_start_records() -> None:
    from sandbox.features import execs

    payload = execs.start_payload(["sh", "-c", "a b"], {"K": "v"}, "/w", (24, 80), closed=0b010)
    assert payload.split(b"\0")[:-1] == [b"Ash", b"A-c", b"Aa b", b"EK=v", b"C/w", b"T1", b"R24", b"W80", b"F2"]
    assert b"F" not in execs.start_payload(["true"], {}, None)


def test_rlimit_and_mount_records() -> None:
    steps = (
        protocol.MountStep(protocol.MOP_OVERLAY, "/home/a:b, c"),
        protocol.MountStep(protocol.MOP_TMPFS, "/scratch", tag="u", mode=0o1777, size="64M"),
    )
    spec = CommandSpec(argv=("true",), env=(), cwd="/", home="/root", uid=0, gid=0, rlimits=((3, 8388608, -1),), mounts=steps)
    _, records = decode(protocol.encode_spec(spec))
    assert [v for k, v in records if k == "Z"] == ["3 8388608 -1"]
    # The guest splits on the first four colons: the path keeps its own.
    assert [v for k, v in records if k == "m"] == ["O::::/home/a:b, c", "T:u:1777:64M:/scratch"]


def _c_defines() -> dict[str, str]:
    text = (Path(__file__).resolve().parent.parent / "guest-init" / "protocol.h").read_text()
    return {m[1]: m[2] for m in re.finditer(r"^#define (\w+) (\S+)", text, re.M)}


def test_constants_match_the_guest_header() -> None:
    defines = _c_defines()
    names = [n for n in dir(protocol) if re.fullmatch(r"(PORT|TTY|EXEC|MOP|X11|MUX)_[A-Z0-9_]+|ROOT_TAG|MAX_EXEC|HOSTNAME_MAX", n) and n not in ("PORT_NAMES", "MUX_HEADER")]
    assert len(names) >= 37
    for name in names:
        value = getattr(protocol, name)
        c_value = defines[name]
        if isinstance(value, bytes):
            assert c_value == f"'{value.decode()}'", name
        elif isinstance(value, str):
            assert c_value in (f"'{value}'", f'"{value}"'), name
        else:
            assert int(c_value) == value, name


@pytest.mark.parametrize(
    "line",
    [
        b"1 T made_up_phase 5",  # not one of the init's phases
        b"1 T ready 99999999999999999999999",  # beyond 64 bits
        b"1 S 256 0 0",  # no status is that large
        b"1 S -1 0 0",
        b"1 X 1 2 2",  # exec failures are 125 (set-up), 126 or 127
        b"1 X 127 2 9",  # no such stage
        b"1 O -3",
        b"x T ready 5",
        b"1 T ready " + b"9" * 5000,  # too long a line
        b"1 S 0 1e3 0",
        b"1 S 0 0 0 -2",  # stdin taken: -1 (not counted) or a count
        b"1 S 0 0 0 1 2",
    ],
)
def test_hostile_control_lines_are_refused(line: bytes) -> None:
    assert protocol.parse_line(line) is None


def test_guest_text_is_made_printable_and_short() -> None:
    sent, msg = protocol.parse_line(b"1 E \x1b]0;pwned\x07bad \xff" + b"x" * 1000)  # type: ignore[misc]
    assert isinstance(msg, protocol.Fatal)
    assert "\x1b" not in msg.message and "\x07" not in msg.message and msg.message.startswith("\\x1b]0;pwned\\x07bad")
    assert len(msg.message) <= protocol.MAX_TEXT + 3


def test_the_status_line_says_how_much_stdin_the_command_took() -> None:
    assert protocol.parse_line(b"1 S 3 10 20 7") == (1, protocol.Finished(3, 10, 20, 7))
    assert protocol.parse_line(b"1 S 3 10 20 -1") == (1, protocol.Finished(3, 10, 20, -1))
    assert protocol.parse_line(b"1 S 3 10 20") == (1, protocol.Finished(3, 10, 20))  # a backend's older init
