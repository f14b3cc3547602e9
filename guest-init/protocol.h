/* Host <-> guest protocol of the sandbox init.  The Python side lives in
 * sandbox/wire/protocol.py; keep the two in step.
 *
 * Every channel is a virtio-serial port, found in the guest as
 * /dev/vport<dev>p<NR> (the device index varies, the port number does not).
 */
#ifndef SANDBOX_PROTOCOL_H
#define SANDBOX_PROTOCOL_H

#define PORT_CONTROL 1 /* line messages, both ways */
#define PORT_STDIN 2   /* host -> guest; host closing it is EOF */
#define PORT_STDOUT 3  /* guest -> host, raw bytes */
#define PORT_STDERR 4  /* guest -> host, raw bytes */
#define PORT_X11 5     /* multiplexed X11 streams (optional) */
#define PORT_EXEC 6    /* multiplexed `sandbox exec` processes */

/* Host -> guest, first on the control port:
 *   "SPEC <len>\n" then <len> bytes of NUL-terminated records "<key><value>",
 *   key one letter:
 *     A argv element     E env entry        C cwd        H home directory
 *     U uid   G gid      S supplementary gid (repeated)   M umask (octal)
 *     T tty mask (TTY_* bits, TTY_STDIN_FILE)   R rows   W cols
 *     F closed mask: bit 1 << fd set when the launcher's fd 0, 1 or 2 was
 *       closed; the command gets that fd closed too
 *     X x11 display number   Y xpra mode ("1")
 *     Z "<resource> <soft> <hard>" an rlimit for the command (-1: unlimited)
 *     m "<op>:<tag>:<octal mode>:<size>:<path>" one mount step (MOP_*),
 *       done in order over the read-only root; the path is the guest's
 *     r 64 random bytes in hex, mixed into the guest's pool and credited
 *     t the host's CLOCK_REALTIME in ns when the spec was made
 *     n "<mac> <ipv4/len|dhcp|-> <gateway4|-> <ipv6 0|1|2> <wait_ms> <mtu> <mode>"
 *       the network interface (--net; none: no record, no interface)
 *     d a name server (repeated)    s the DNS search list
 *     N the guest's host name (the sandbox's name), set before the command
 *       runs; without it the kernel's "(none)" stays
 * The init stamps "ready" just before it reads the spec (a template is
 * taken there) and "spec_read" just after; the host answers the latter:
 *   "C <realtime_ns>\n"  the host's wall clock, set before the command starts
 * Later, host -> guest:
 *   "K <signo>\n"        deliver a signal to the command's process group
 *   "W <rows> <cols>\n"  window size changed
 *   "P <fd>\n"           host's stdout (1) or stderr (2) is gone: EPIPE
 *   "I <bytes>\n"        stdin ends after this many bytes in all (sent at the
 *                        host's EOF, beside the port's half-close, which a
 *                        libvirt stream cannot do)
 *   "A\n"                everything received: power off now
 * Guest -> host, every line starts with the guest's CLOCK_BOOTTIME in ns
 * at the time of sending:
 *   "<ns> T <phase> <stamp_ns>\n"           phase timestamp
 *   "<ns> X <exitcode> <errno> <stage>\n"   command could not be started
 *                                          (EXEC_STAGE_*; the host words it)
 *   "<ns> N <name>\n"                       the command looked up a host name
 *   "<ns> O <count>\n"                      the OOM killer killed processes
 *   "<ns> S <status> <out_bytes> <err_bytes>\n"  command finished
 *   "<ns> L <message>\n"                    diagnostic for the launcher log
 *   "<ns> E <message>\n"                    fatal set-up error; the VM stops
 */

/* The 9p mount tag of the host's root; shares are tagged by the host's plan. */
#define ROOT_TAG "root"

/* The longest host name (an N record); Linux's own limit. */
#define HOSTNAME_MAX 64

#define TTY_STDIN 1
#define TTY_STDOUT 2
#define TTY_STDERR 4
/* In the T mask too: the launcher's stdin is a regular file.  The init
 * then keeps the command's stdin pipe countable, and its S line says how
 * many bytes the command took; the launcher gives the rest back to the
 * file's offset, as the command run directly would have left it. */
#define TTY_STDIN_FILE 8

#define EXEC_STAGE_CREDS 0
#define EXEC_STAGE_CWD 1
#define EXEC_STAGE_EXEC 2
#define EXEC_STAGE_RLIMIT 3

/* Mount steps (tag: the 9p mount tag; for MOP_TMPFS "u" = owned by the user) */
#define MOP_OVERLAY 'O'   /* the host's dir at path, copy-on-write */
#define MOP_TMPFS 'T'     /* an empty tmpfs */
#define MOP_SHARE_RO 'R'  /* 9p share `tag`, read-only */
#define MOP_SHARE_RW 'W'  /* 9p share `tag`, writes reach the host */
#define MOP_SHARE_COW 'C' /* 9p share `tag`, copy-on-write */
#define MOP_HOME 'h'      /* the home dir, made empty if missing */
#define MOP_HIDE_DIR 'H'  /* an empty private dir over path */
#define MOP_HIDE_FILE 'F' /* an empty private file over path */
#define MOP_MKDIR 'D'     /* a mount point the read-only root lacks */
#define MOP_IMAGE 'I'     /* an erofs image (tag: its host path) of the host's tree at path */

#define X11_OPEN 'O'
#define X11_DATA 'D'
#define X11_CLOSE 'C'
#define X11_READY 'R' /* --x11=xpra, guest -> host: the xpra server is ready */
/* X11 port framing (both ways): 1 byte type, 4 bytes connection id (LE),
 * 4 bytes payload length (LE), payload.  Connections are opened by the
 * guest for --x11 (its clients dial out) and by the host for --x11=xpra
 * (the host's xpra client dials in). */
#define XPRA_DIR "/tmp/.sandbox-xpra" /* the xpra server's socket and ready FIFO */
#define MUX_HDR 9 /* the header of a frame on a multiplexed port (X11, exec) */
#define X11_HDR MUX_HDR
#define MUX_MAX_PAYLOAD 262144 /* no frame is larger, either way (the init's BUFSZ) */

/* `sandbox exec` frames on PORT_EXEC, same header as X11's (type, id, len):
 * host -> guest: EXEC_START (payload: NUL-terminated records "A<arg>",
 *   "E<NAME=value>" added to the main command's environment, "C<cwd>",
 *   "T1" a terminal for all three streams, "R<rows>", "W<cols>" its size,
 *   "F<mask>" bit 1 << fd: the client's fd 0, 1 or 2 was closed, so is the
 *   process's),
 *   EXEC_STDIN (data), EXEC_STDIN_EOF, EXEC_SIGNAL (payload: decimal signo);
 * guest -> host: EXEC_STDOUT, EXEC_STDERR (data), EXEC_EXIT (payload:
 *   decimal status, 128+N for signal N; sent after all of its output). */
#define EXEC_START 'S'
#define EXEC_STDIN 'I'
#define EXEC_STDIN_EOF 'i'
#define EXEC_SIGNAL 'K'
#define EXEC_STDOUT 'O'
#define EXEC_STDERR 'R'
#define EXEC_EXIT 'X'
#define MAX_EXEC 16

#endif
