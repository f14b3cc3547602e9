"""`--x11`: an app in the guest shows on the host's display through a private Xephyr."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import SANDBOX, popen, run_sandbox, stderr_lines

pytestmark = [pytest.mark.vm, pytest.mark.x11]

TOOLS = ("Xvfb", "Xephyr", "xdotool", "xwininfo", "xprop", "xmessage", "xdpyinfo", "import")


@pytest.fixture(scope="module")
def desktop() -> Iterator[str]:
    """A host "desktop": an Xvfb display of our own."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"X11 tests need {missing} (./setup.sh installs them)")
    r, w = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(w), "-screen", "0", "1280x1024x24", "-nolisten", "tcp", "-noreset"],
                            pass_fds=(w,), stderr=subprocess.DEVNULL)  # fmt: skip
    os.close(w)
    number = b""
    while not number.endswith(b"\n"):
        chunk = os.read(r, 16)
        if not chunk:
            break
        number += chunk
    os.close(r)
    try:
        yield f":{int(number)}"
    finally:
        xvfb.terminate()
        xvfb.wait(10)


@dataclass
class Launched:
    proc: subprocess.Popen[bytes]
    stderr: list[str]
    helpers: list[int] = field(default_factory=list)  # the launcher's Xephyr or xpra client, once seen

    def helpers_gone(self) -> bool:
        """This launcher's own display helpers are gone (other sandboxes' Xephyrs on the machine are theirs)."""
        return not any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2] for pid in self.helpers)

    def watch_helpers(self, name: str) -> None:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", name], capture_output=True, text=True).stdout
        self.helpers += [int(p) for p in out.split() if int(p) not in self.helpers]

    def nested(self, timeout: float = 30) -> tuple[str, str]:
        """(display, Xauthority) of the nested server, for test tools only."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stderr:
                m = re.search(r"nested X server (:\d+)", line)
                if m:
                    out = subprocess.run(["pgrep", "-a", "-P", str(self.proc.pid), "Xephyr"], capture_output=True, text=True).stdout
                    auth = re.search(r"-auth (\S+)", out)
                    assert auth, out
                    self.helpers += [int(ln.split()[0]) for ln in out.splitlines() if int(ln.split()[0]) not in self.helpers]
                    return m.group(1), auth.group(1)
            time.sleep(0.05)
        raise AssertionError(f"no nested server announced: {self.stderr}")


def launch(desktop: str, *command: str, mode: str = "xephyr") -> Launched:
    proc = popen([*SANDBOX, "run", "-v", f"--x11={mode}", "--", *command],
                            env=dict(os.environ, DISPLAY=desktop), stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    lines: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            lines.append(raw.decode(errors="replace"))

    threading.Thread(target=pump, daemon=True).start()
    return Launched(proc, lines)


def x(display: str, auth: str | None, *argv: str) -> str:
    env = dict(os.environ, DISPLAY=display)
    if auth:
        env["XAUTHORITY"] = auth
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30).stdout


def wait_for(predicate, timeout: float = 90, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_xmessage_shows_on_the_desktop_and_its_button_ends_the_sandbox(desktop: str, tmp_path: Path) -> None:
    run = launch(desktop, "xmessage", "-name", "sbtest", "hello from the guest")
    try:
        nested, auth = run.nested()
        # The nested server's window on the host, titled with the sandbox and its label.
        outer = wait_for(lambda: x(desktop, None, "xdotool", "search", "--onlyvisible", "--name", "sandbox: xmessage").split(),
                         what="the Xephyr window")  # fmt: skip
        title = x(desktop, None, "xdotool", "getwindowname", outer[0]).strip()
        assert title.startswith("sandbox: xmessage") and "[" in title, title
        # The app's window, inside the nested server.
        inner = wait_for(lambda: x(nested, auth, "xdotool", "search", "--onlyvisible", "--classname", "sbtest").split(),
                         what="the xmessage window")  # fmt: skip
        time.sleep(0.5)  # let it draw
        shot = tmp_path / "desktop.png"
        subprocess.run(["import", "-display", desktop, "-window", "root", str(shot)], check=True, timeout=30)
        geo = x(nested, auth, "xwininfo", "-id", inner[0])
        left = int(re.search(r"Absolute upper-left X:\s+(\d+)", geo).group(1))  # type: ignore[union-attr]
        top = int(re.search(r"Absolute upper-left Y:\s+(\d+)", geo).group(1))  # type: ignore[union-attr]
        width = int(re.search(r"Width:\s+(\d+)", geo).group(1))  # type: ignore[union-attr]
        height = int(re.search(r"Height:\s+(\d+)", geo).group(1))  # type: ignore[union-attr]
        # Xephyr's window sits at the host's origin here: nested coordinates are host coordinates.
        colours = subprocess.run(
            ["convert", str(shot), "-crop", f"{width}x{height}+{left}+{top}", "-format", "%k", "info:"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert int(colours) >= 2, "the message area is blank"
        background = subprocess.run(["convert", str(shot), "-crop", "200x200+900+700", "-format", "%k", "info:"],
                                    capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert int(background) == 1, "the rest of the screen should be plain background"
        # Press the button: the smallest window inside the app is the "okay" command widget.
        tree = x(nested, auth, "xwininfo", "-tree", "-id", inner[0])
        boxes = [tuple(map(int, m)) for m in re.findall(r"\s(\d+)x(\d+)\+-?\d+\+-?\d+\s+\+(-?\d+)\+(-?\d+)", tree)]
        w, h, bx, by = min((b for b in boxes if b[0] > 20 and b[1] > 10), key=lambda b: b[0] * b[1])
        x(nested, auth, "xdotool", "mousemove", str(bx + w // 2), str(by + h // 2), "click", "1")
        assert run.proc.wait(90) == 0
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        print("launcher stderr:", "".join(run.stderr))  # shown when the test fails
    # The nested server closed with the app.
    assert run.helpers and run.helpers_gone()


def test_closing_the_nested_window_ends_the_sandbox(desktop: str) -> None:
    run = launch(desktop, "xmessage", "-name", "sbclose", "close me")
    try:
        nested, auth = run.nested()
        wait_for(lambda: x(nested, auth, "xdotool", "search", "--onlyvisible", "--classname", "sbclose").strip(),
                 what="the xmessage window")  # fmt: skip
        # The user closes Xephyr's window: Xephyr exits, as it does then.
        xephyr = subprocess.run(["pgrep", "-P", str(run.proc.pid), "-x", "Xephyr"], capture_output=True, text=True).stdout.split()
        assert len(xephyr) == 1
        os.kill(int(xephyr[0]), 15)
        status = run.proc.wait(60)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        print("launcher stderr:", "".join(run.stderr))  # shown when the test fails
    # The app lost its display and the sandbox is over: how the app dies
    # depends on what it was doing when its connection went (reading:
    # Xlib's I/O error, exit 1; writing: SIGPIPE, seen once in ~40 runs),
    # or the hang-up.
    assert status in (1, 128 + 1, 128 + 13), "".join(run.stderr)


def test_the_guest_sees_nothing_of_the_host_desktop(desktop: str) -> None:
    secret = subprocess.Popen(["xmessage", "-title", "HOST-SECRET", "host only"], env=dict(os.environ, DISPLAY=desktop))
    try:
        subprocess.run(["xprop", "-display", desktop, "-root", "-f", "SB_HOST_SECRET", "8s", "-set", "SB_HOST_SECRET", "s3cret"], check=True)
        wait_for(lambda: x(desktop, None, "xdotool", "search", "--name", "HOST-SECRET").strip(), what="the host window")
        assert "HOST-SECRET" in x(desktop, None, "xwininfo", "-root", "-tree")  # it is there to be seen
        proc = run_sandbox("sh", "-c", "xwininfo -root -tree; echo ===; xprop -root; env | grep -c XAUTHORITY",
                           env=dict(os.environ, DISPLAY=desktop, XAUTHORITY="/nonexistent/host-cookie"),
                           run_opts=("--x11",), timeout=180)  # fmt: skip
    finally:
        secret.kill()
        secret.wait()
    out = proc.stdout.decode()
    assert proc.returncode == 1, proc.stderr  # grep -c found no XAUTHORITY: the variable is gone
    tree, props = out.split("===")
    assert "Root window id" in tree  # the guest did see a display: the nested one
    assert "HOST-SECRET" not in out and "SB_HOST_SECRET" not in out and "s3cret" not in out
    assert props.strip().splitlines()[-1] == "0"


def test_several_connections_at_once(desktop: str) -> None:
    script = ("d=$(mktemp -d); (xdpyinfo > $d/a; echo a $? >&2) & (xwininfo -root -tree > $d/b; echo b $? >&2) & (xprop -root > $d/c; echo c $? >&2) & wait; "
              "grep -h -m1 -e 'name of display' -e 'Root window id' $d/a $d/b; wc -l < $d/c; wc -c $d/b >&2")
    proc = run_sandbox("sh", "-c", script, env=dict(os.environ, DISPLAY=desktop), run_opts=("--x11",), timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[0].startswith("name of display:") and "Root window id" in lines[1], (lines, proc.stderr)
    assert int(lines[2]) >= 1  # the nested root has properties of its own


def test_x11_errors_are_one_line_and_name_the_package(desktop: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    proc = run_sandbox("true", env=env, run_opts=("--x11",))
    assert proc.returncode == 125 and stderr_lines(proc) == [
        "sandbox: --x11 needs a desktop, and DISPLAY is not set (a virtual one: apt-get install xvfb)"]
    # No Xephyr on PATH (only what the launcher itself needs).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("qemu-system-x86_64", "cc"):
        found = shutil.which(tool)
        assert found
        (bin_dir / tool).symlink_to(found)
    proc = run_sandbox("true", env=dict(os.environ, DISPLAY=desktop, PATH=str(bin_dir)), run_opts=("--x11",))
    assert proc.returncode == 125
    assert stderr_lines(proc) == ["sandbox: --x11 needs Xephyr; apt-get install xserver-xephyr"]
    # A display that is not there: Xephyr cannot start.
    proc = run_sandbox("true", env=dict(os.environ, DISPLAY=":987"), run_opts=("--x11",))
    assert proc.returncode == 125
    [line] = stderr_lines(proc)
    assert line.startswith("sandbox: --x11: Xephyr could not start on :987")
    # No xpra on PATH.
    proc = run_sandbox("true", env=dict(os.environ, DISPLAY=desktop, PATH=str(bin_dir)), run_opts=("--x11=xpra",))
    assert proc.returncode == 125 and stderr_lines(proc) == ["sandbox: --x11=xpra needs xpra; apt-get install xpra"]


def test_xpra_mode_shows_the_app_as_a_desktop_window(desktop: str, tmp_path: Path) -> None:
    """--x11=xpra: an xpra server in the guest, its client on the desktop; a click ends the app."""
    if shutil.which("xpra") is None:
        pytest.fail("xpra is needed (./setup.sh installs it)")
    run = launch(desktop, "xmessage", "-name", "sbxpra", "hello through xpra", mode="xpra")
    try:
        # The app's own window on the desktop (no nested root): xpra titles
        # it with the app's title (xmessage's is its -name), the sandbox in
        # brackets.  The server takes
        # ~40 s to start under TCG.
        win = wait_for(lambda: x(desktop, None, "xdotool", "search", "--onlyvisible", "--name", r"^sbxpra \(sandbox: xmessage").split(),
                       timeout=240, what="the xpra window of xmessage")  # fmt: skip
        title = x(desktop, None, "xdotool", "getwindowname", win[0]).strip()
        assert "[" in title and "sbxpra" in title, title
        assert subprocess.run(["pgrep", "-P", str(run.proc.pid), "-x", "Xephyr"], capture_output=True).stdout == b""  # no nested server in this mode
        run.watch_helpers("xpra attach")
        geo = x(desktop, None, "xwininfo", "-id", win[0])
        left = int(re.search(r"Absolute upper-left X:\s+(\d+)", geo).group(1))  # type: ignore[union-attr]
        top = int(re.search(r"Absolute upper-left Y:\s+(\d+)", geo).group(1))  # type: ignore[union-attr]
        width = int(re.search(r"Width:\s+(\d+)", geo).group(1))  # type: ignore[union-attr]
        height = int(re.search(r"Height:\s+(\d+)", geo).group(1))  # type: ignore[union-attr]
        shot = tmp_path / "desktop.png"

        def colours() -> int:
            # The guest's server paints the window some seconds after mapping it, under TCG.
            subprocess.run(["import", "-display", desktop, "-window", "root", str(shot)], check=True, timeout=30)
            out = subprocess.run(
                ["convert", str(shot), "-crop", f"{width}x{height}+{left}+{top}", "-format", "%k", "info:"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            return int(out) if int(out) >= 2 else 0

        wait_for(colours, timeout=90, what="xpra to paint the xmessage window")
        time.sleep(1)
        # xmessage puts its "okay" button at the bottom left: a click there,
        # forwarded by xpra to the guest, ends the app and the sandbox.
        x(desktop, None, "xdotool", "mousemove", str(left + 20), str(top + height - 12), "click", "1")
        assert run.proc.wait(120) == 0, run.stderr
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        print("launcher stderr:", "".join(run.stderr))  # shown when the test fails
    assert any("xpra client started" in line for line in run.stderr), run.stderr
    assert run.helpers and run.helpers_gone()


def test_sigterm_while_the_nested_server_starts_leaves_nothing(desktop: str) -> None:
    # The signal lands while the launcher is still setting up (Xephyr just
    # announced, the VM not yet running): it must unwind, not die on the spot
    # leaving Xephyr's files and the runtime dir behind.
    before = set(Path(tempfile.gettempdir()).glob("sandbox-x11-*"))
    run = launch(desktop, "sleep", "30")
    try:
        run.nested()
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        print("launcher stderr:", "".join(run.stderr))  # shown when the test fails
    assert set(Path(tempfile.gettempdir()).glob("sandbox-x11-*")) == before
    assert run.helpers and run.helpers_gone()


def test_send_key_reaches_an_x11_app_through_xtest(desktop: str) -> None:
    name = f"xkeys-{os.getpid()}"
    # xev on the nested root: with no window manager the focus follows the
    # pointer, which rests on the root, so key events land there.
    proc = popen([*SANDBOX, "run", "--name", name, "--rm", "--x11", "--", "sh", "-c", "echo ready; exec xev -root -event keyboard"],
                 env=dict(os.environ, DISPLAY=desktop), stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(1)  # xev has selected its events
        # X takes every key up to its last keycode, those QEMU 7.2 has no QKeyCode for too (F13, F24, Katakana, Print).
        sends = (("linux", ["KEY_A"]), ("usb", ["5"]), ("win32", ["VK_RETURN"]), ("linux", ["KEY_F13", "KEY_F24"]),
                 ("os_x", ["kVK_JIS_Eisu"]), ("xt_kbd", ["0x78"]), ("linux", ["KEY_PRINT"]))  # fmt: skip
        for codeset, keys in sends:
            sent = subprocess.run([*SANDBOX, "send-key", name, "--codeset", codeset, *keys], capture_output=True, timeout=60)
            assert sent.returncode == 0, sent.stderr
        # Beyond X's keycodes: one line, and nothing pressed.
        refused = subprocess.run([*SANDBOX, "send-key", name, "KEY_B", "BTN_0"], capture_output=True, timeout=60)
        assert refused.returncode == 125
        assert refused.stderr == b"sandbox: cannot send BTN_0 (Linux 256) through X11: X keycodes (Linux code + 8) run from 8 to 255\n"
        expected = [30, 48, 28, 183, 194, 123, 90, 210]  # a, b, Return, F13, F24, Hanja, Katakana, Print
        seen: list[int] = []
        deadline = time.monotonic() + 60
        while (len(seen) < len(expected) or seen[-1] == -1) and time.monotonic() < deadline:
            line = proc.stdout.readline().decode(errors="replace")
            if not line:
                break
            if "KeyPress event" in line:
                seen.append(-1)
            m = re.search(r"keycode (\d+)", line)
            if m and seen and seen[-1] == -1:
                seen[-1] = int(m.group(1))
        assert seen == [code + 8 for code in expected]  # X keycodes are Linux codes + 8
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
