"""X11 round trips (GetInputFocus) against $DISPLAY, in raw protocol: no Xlib needed.

Runs in the guest (no credentials: the launcher adds them) or on the host
against the nested server (MIT-MAGIC-COOKIE-1 from the Xauthority file named
by the second argument).  Prints the median and 90th percentile in µs.
"""

import os
import socket
import statistics
import struct
import sys
import time


def cookie_from(path: str) -> bytes:
    data = open(path, "rb").read()
    pos = 2
    fields = []
    for _ in range(4):
        (n,) = struct.unpack_from(">H", data, pos)
        fields.append(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
    return fields[3]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    cookie = cookie_from(sys.argv[2]) if len(sys.argv) > 2 else b""
    display = os.environ["DISPLAY"].lstrip(":").split(".")[0]
    s = socket.socket(socket.AF_UNIX)
    s.connect(f"/tmp/.X11-unix/X{display}")
    name = b"MIT-MAGIC-COOKIE-1" if cookie else b""

    def pad(b: bytes) -> bytes:
        return b + b"\0" * ((4 - len(b) % 4) % 4)

    s.sendall(struct.pack("<ccHHHHH", b"l", b"\0", 11, 0, len(name), len(cookie), 0) + pad(name) + pad(cookie))
    head = s.recv(8, socket.MSG_WAITALL)
    assert head[0] == 1, f"connection refused: {head!r}"
    (extra,) = struct.unpack_from("<H", head, 6)
    s.recv(extra * 4, socket.MSG_WAITALL)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        s.sendall(struct.pack("<BBH", 43, 0, 1))  # GetInputFocus
        s.recv(32, socket.MSG_WAITALL)
        times.append((time.perf_counter() - t) * 1e6)
    times.sort()
    print(f"roundtrip_us median {statistics.median(times):.0f} p90 {times[int(0.9 * n)]:.0f} n {n}")


main()
