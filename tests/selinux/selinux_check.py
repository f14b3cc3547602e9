"""Runs inside a guest booted with selinux=1: loads the policy built with the
project's module, enforces it, and drives the project's labelling code.

Prints one line per fact for the host-side test to check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sandbox.confinement import libselinux as seclabel, mcs as labels
from sandbox.backends.direct.bootimages import BootImage


def main() -> int:
    policy = Path(sys.argv[1]).read_bytes()
    subprocess.run(["mount", "-t", "selinuxfs", "selinuxfs", "/sys/fs/selinux"], check=True)
    # One write(): the kernel takes the policy only whole.
    fd = os.open("/sys/fs/selinux/load", os.O_WRONLY)
    written = os.write(fd, policy)
    os.close(fd)
    print(f"loaded {written}/{len(policy)}")
    Path("/sys/fs/selinux/enforce").write_text("1")
    print("enforce", Path("/sys/fs/selinux/enforce").read_text().strip())
    print("enabled", seclabel.enabled())
    print("launcher", seclabel.current())

    # A tmpfs of our own: the guest's /tmp is nosuid, and SELinux refuses
    # domain transitions from nosuid mounts (as it would QEMU's on a host).
    work = Path("/mnt")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "selinux-check", str(work)], check=True)
    # A static binary labelled as QEMU's executable: the entrypoint sandbox_t
    # allows, without the 9p-shared (unlabelled) libraries a real QEMU loads.
    stub = work / "busybox"  # busybox picks the applet from argv[1] under this name
    shutil.copy(shutil.which("busybox") or "/bin/busybox", stub)
    seclabel.set_file_label(stub, "system_u:object_r:qemu_exec_t:s0")

    mine = labels.reserve(work / "mcs")
    other = labels.reserve(work / "mcs")
    process, image = labels.sandbox_contexts(mine.pair, "sandbox_t", "sandbox_image_t")
    _, other_image = labels.sandbox_contexts(other.pair, "sandbox_t", "sandbox_image_t")
    print("pairs", mine.pair, other.pair)
    same, different = work / "same", work / "different"
    same.write_text("same pair\n")
    different.write_text("other pair\n")
    seclabel.set_file_label(same, str(image))
    seclabel.set_file_label(different, str(other_image))
    print("file", seclabel.file_label(same))

    def spawn(*args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(stub), *args],
            preexec_fn=lambda: seclabel.set_exec_label(str(process)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    sleeper = spawn("sleep", "30")
    time.sleep(0.3)
    print("process", Path(f"/proc/{sleeper.pid}/attr/current").read_text().rstrip("\0\n"))
    sleeper.kill()
    sleeper.wait()
    for name, path in (("same", same), ("different", different)):
        out, _ = spawn("cat", str(path)).communicate()
        text = out.decode().strip().replace("\n", " ")
        print(f"read-{name} {text}")
    # A boot image as QEMU gets it: a sealed memfd, inherited.
    boot = work / "vmlinux.pvh"
    boot.write_text("boot image\n")
    image_fd = BootImage(boot, private=True)
    reader = subprocess.Popen(
        [str(stub), "cat", str(image_fd.proc_path)],
        preexec_fn=lambda: seclabel.set_exec_label(str(process)),
        pass_fds=(image_fd.fd,),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = reader.communicate()
    print("read-memfd", out.decode().strip().replace("\n", " "))
    print("memfd-label", os.getxattr(image_fd.proc_path, "security.selinux").rstrip(b"\0").decode())
    image_fd.close()
    mine.release()
    other.release()
    for line in denials().splitlines():
        print("denial", line)
    return 0


def denials() -> str:
    """The kernel's AVC denials so far, to explain a failure."""
    log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    return "\n".join(line for line in log.splitlines() if "avc:" in line)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        print(denials(), file=sys.stderr)
        raise
