#!/bin/sh
# Installs what sandbox needs on Debian 12 (as root), then the package into .venv.
set -eu
cd "$(dirname "$0")"
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        qemu-system-x86 linux-image-amd64 gcc libc6-dev libselinux1 python3 python3-venv \
        cpio procps util-linux busybox-static time \
        xvfb xserver-xephyr x11-apps x11-utils xdotool xauth imagemagick \
        selinux-policy-default selinux-utils policycoreutils semodule-utils checkpolicy selinux-policy-dev make \
        passt dnsmasq-base nftables iproute2 radvd iperf3 erofs-utils \
        libvirt-daemon-system libvirt-dev pkg-config python3-dev openssh-server \
        man-db bash-completion
    # --x11=xpra: with its recommends (codecs, PIL), as tested; its client
    # paints through cairo, which Debian's package does not pull in.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q xpra python3-gi-cairo
    # libvirt for --connect qemu:///system: without systemd nothing starts
    # it; tools/libvirtd.py runs virtlogd and libvirtd under a reaper, unless
    # one already answers (a stale socket file does not count).
    python3 tools/libvirtd.py --ensure
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,libvirt]'
# Bytecode now: an environment with PYTHONDONTWRITEBYTECODE (as here) would
# otherwise compile the launcher's modules on every run (~70 ms).
.venv/bin/python -m compileall -q sandbox
# `sandbox` and `man sandbox` are this tool's, not SELinux's (policycoreutils'
# /usr/bin/sandbox and sandbox(8)): /usr/local/bin comes first on Debian's
# PATH, and man reads section 1 before 8.  Links .venv/bin/sandbox, writes
# the man page and the bash completion, generated from the parser.
if [ "$(id -u)" -eq 0 ]; then .venv/bin/python -m sandbox.cli.install --prefix /usr/local; fi
