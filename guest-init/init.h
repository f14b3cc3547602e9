/* sandbox guest init: PID 1 of the throw-away VM.
 *
 * Loads the few modules it needs, mounts the host root read-only over 9p with
 * private tmpfs on top, runs one command as the caller, relays its stdio over
 * virtio-serial ports, reports status and phase stamps, and powers off.
 * Every step is on the start-up path, so it does no more than it must.
 *
 * One file per concern; this header holds what they share (protocol.h is
 * the host/guest protocol, kept in step with sandbox/wire/protocol.py):
 *   main.c     the steps from boot to power-off, and the event loop
 *   utils.c    the clock, whole reads and writes
 *   control.c  the control port: lines to and from the host, fatal errors,
 *              power-off, the clock and the random pool
 *   spec.c     the command's spec: read from the port, parsed (pure)
 *   memory.c   zeroing free memory before a template; OOM kills
 *   modules.c  loading the kernel modules
 *   ports.c    finding and opening the virtio-serial ports
 *   mounts.c   the mount plan and the switch into the new root
 *   net.c      the network interface: addresses, routes, IPv6
 *   dhcp.c     the DHCP client (messages built and parsed purely)
 *   dns.c      resolv.conf, and the refusing resolver of a guest with no network
 *   process.c  starting a process as the command's user (the command, `sandbox exec`)
 *   pump.c     the command's stdio relays
 *   mux.c      frames on a multiplexed port (X11, exec)
 *   x11.c      X11 connections over their port
 *   exec.c     `sandbox exec` processes over their port
 *
 * The pure functions (no I/O, no die) are marked so: tests/init_units.c
 * runs them on the host.
 */
#ifndef SANDBOX_INIT_H
#define SANDBOX_INIT_H

#include <netinet/in.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/types.h>

#include "protocol.h"

#define NEWROOT "/newroot"
#define BUFSZ MUX_MAX_PAYLOAD /* a relay's buffer: one frame's payload */

/* ---- the command's spec (spec.c) ----------------------------------------- */

struct rlim {
	int resource;
	struct rlimit lim;
};

/* One step of the host's mount plan (sandbox/plan/mounts.py), done in order. */
struct mop {
	char op;
	const char *tag, *path;
	mode_t mode;
	const char *size;
};

struct spec {
	char **argv, **envp; /* as many as the host sent: its execve took them */
	int argc, envc;
	const char *cwd, *home;
	uid_t uid;
	gid_t gid;
	gid_t *groups;
	int ngroups;
	mode_t umask;
	int tty, rows, cols, x11, xpra, rw_share, closed;
	const char *entropy;   /* hex: host randomness for a restored guest's pool */
	const char *net;       /* "<mac> <ipv4/len|dhcp|-> <gw4|-> <ipv6 0|1|2> <wait_ms> <mtu> <mode>" */
	const char **dns;      /* name servers for resolv.conf */
	int ndns;
	const char *search;
	const char *hostname; /* the sandbox's name, or NULL */
	long long realtime_ns; /* the host's wall clock when it sent the spec */
	struct rlim *rlims;
	int nrlims;
	struct mop *mops;
	int nmops;
};

void read_spec(struct spec *s);
/* Pure: the records in buf[0, len) into *s (whose strings point into buf);
 * NULL, or why the spec is malformed (then *s holds nothing to free). */
const char *spec_parse(char *buf, size_t len, struct spec *s);
void spec_free(struct spec *s);
/* Pure: "<op>:<tag>:<octal mode>:<size>:<path>" (v is cut up in place); NULL or why not. */
const char *parse_mop(char *v, struct mop *m);

/* ---- helpers (utils.c) ----------------------------------------------------- */

uint64_t now_ns(void); /* CLOCK_BOOTTIME */
void write_all(int fd, const char *p, size_t n);
int set_nonblock(int fd);
ssize_t read_file(const char *path, char *buf, size_t sz);

/* ---- the control port (control.c) ---------------------------------------- */

extern int ctl_fd;

void ctl_send(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void stamp(const char *phase);
void ctl_open(void);
/* Lines from the host: ctl_read takes in what the port has (0: nothing),
 * ctl_lines hands each complete one to `fn`; 1 if any `fn` returned 1. */
int ctl_read(void);
int ctl_lines(int (*fn)(char *line, void *arg), void *arg);
void sync_clock(uint64_t sent_ns);
void set_realtime(long long ns);
void reseed(const char *hex);
_Noreturn void power_off(void);
_Noreturn void die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void console_say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- boot (modules.c, ports.c, memory.c) --------------------------------- */

void load_modules(void);
/* Pure: the "mod.key=val" options for `mod` on the kernel command line, as "key=val " ... */
void module_params(const char *cmdline, const char *mod, char *out, size_t outsz);
int open_port(int nr, int flags, int timeout_ms);
void template_prepare(void);
void pool_prepare(void);
void mount_host_root(void);
unsigned long oom_kills(void);

/* ---- filesystems (mounts.c) ---------------------------------------------- */

void early_mounts(void);
void setup_root(const struct spec *s);
int make_dirs(const char *path, mode_t mode);
/* Pure: NEWROOT joined with an absolute guest path; -1 if it does not fit. */
int root_path(char *out, size_t sz, const char *guest_path);
/* A MOP_IMAGE step (images.c): the erofs image at host path `image` over `target`, or (said on the console) nothing. */
void mount_image(const char *image, const char *target, const char *tree);
/* A pooled guest's image mounted ahead, for a run's MOP_IMAGE step of the same image to move into place. */
void premount_image(const char *image);
/* Pure (images.c): the data blob beside an image file, "x.erofs" -> "x.blob"; -1 if it does not fit or end so. */
int blob_path(char *out, size_t sz, const char *image);
/* Pure: the options of a MOP_TMPFS step's tmpfs. */
void tmpfs_opts(char *out, size_t sz, const struct mop *m, uid_t uid, gid_t gid);

/* ---- the network (net.c, dhcp.c, dns.c) ----------------------------------- */

#define NET_IF "eth0"

struct netcfg {
	char mac[32], ipv4[64], gw4[64], mode[64];
	int ipv6, wait_ms, mtu; /* ipv6 0: none, 1: required, 2: if the LAN offers it */
	unsigned char hw[6];
};

void loopback_up(void);
/* Pure: the spec's 'n' record; 0, or -1 if malformed. */
int net_parse(const char *rec, struct netcfg *n);
void net_start(const struct spec *s, struct netcfg *n);
void net_wait(const struct spec *s, struct netcfg *n);
void ipv4_configure(int fd, const struct netcfg *n, in_addr_t addr, int plen, in_addr_t gw);

struct dhcp_msg {
	uint8_t op, htype, hlen, hops;
	uint32_t xid;
	uint16_t secs, flags;
	uint32_t ciaddr, yiaddr, siaddr, giaddr;
	uint8_t chaddr[16], sname[64], file[128];
	uint8_t magic[4], options[312];
};

struct dhcp_lease {
	in_addr_t addr, server, mask, router;
	char dns[3][16];
	int ndns;
};

#define DHCP_DISCOVER 1
#define DHCP_OFFER 2
#define DHCP_REQUEST 3
#define DHCP_ACK 5
#define DHCP_NAK 6

/* Pure: a DISCOVER (offer NULL) or REQUEST for `offer`; returns its length. */
size_t dhcp_request(struct dhcp_msg *m, const unsigned char hw[6], uint32_t xid, int type, const struct dhcp_lease *offer);
/* Pure: the type of the reply's n bytes (0: not ours or malformed), its fields in `l`. */
int dhcp_parse(const struct dhcp_msg *m, size_t n, const unsigned char hw[6], uint32_t xid, struct dhcp_lease *l);
/* Pure: the prefix length of a netmask (network order; 0: the server gave none, /24). */
int mask_plen(in_addr_t mask);
int dhcp(const struct netcfg *n, uint64_t deadline, struct dhcp_lease *lease);

void dns_setup(void);
int dns_socket(void);
void dns_answer(void);
/* Pure: turns the query q[0, n) into its REFUSED answer in place; returns the
 * answer's length (0: none), the first name asked for in `name` ("" if none). */
size_t dns_refusal(unsigned char *q, size_t n, char *name, size_t namesz);
void private_resolv_conf(const struct spec *s);
void resolv_servers(const struct spec *s, const char *const *dns, int ndns);

/* ---- processes (process.c) ------------------------------------------------- */

/* Our ends of a started process's stdio; -1 where it has none. */
struct child {
	pid_t pid;
	int in_w, out_r, err_r, pty;
	int in_keep; /* a read end of the stdin pipe kept (TTY_STDIN_FILE): what the command left unread is counted at its end */
};

/* What the child tells its parent when it cannot run the command. */
struct exec_error {
	int stage, err; /* stage -1: it runs */
};

/* A process to start as the command's user. */
struct proc {
	const struct spec *s; /* whose user, groups, umask and limits */
	char **argv, **envp;
	const char *cwd; /* NULL: / */
	int fds[3];      /* its stdin, stdout and stderr */
	int ctty;        /* a pty slave to make its controlling terminal, or -1 */
	int closed;      /* bit 1 << fd: that fd closed instead (`cmd >&-` on the host) */
};

void child_stdio(struct child *c, struct proc *p, int tty, int rows, int cols, const char *who);
pid_t proc_start(const struct proc *p, struct exec_error *fail);
void proc_close_ends(const struct proc *p);
int exec_error_code(const struct exec_error *e);
int spawn(const struct spec *s, struct child *c);
int child_status_code(int st);

/* ---- relaying (pump.c, mux.c) ------------------------------------------- */

/* One direction of a byte stream: read from src into buf, write to dst. */
struct pump {
	int src, dst;
	char *buf;
	size_t len, off;
	int eof;
	unsigned long long count;
	int close_dst; /* close dst at EOF (the child's stdin) */
	long long limit; /* EOF after this many bytes read ("I <n>"); -1: at the source's own EOF */
	unsigned long long rcount;
};

void pump_init(struct pump *p, int src, int dst, int close_dst);
int pump_active(const struct pump *p);
void pump_finish(struct pump *p);
int pump_run(struct pump *p);
int pump_poll(const struct pump *p, struct pollfd *pfd);

/* Frames from a multiplexed port: at most one partial frame is held. */
struct mux_in {
	size_t len;
	char buf[MUX_HDR + MUX_MAX_PAYLOAD];
};
typedef void mux_frame_fn(void *arg, char type, uint32_t id, char *data, uint32_t len);

/* Pure: a frame's header. */
void mux_header(char hdr[MUX_HDR], char type, uint32_t id, uint32_t len);
void mux_send(int port, char type, uint32_t id, const char *data, uint32_t len);
int mux_relay(int port, int fd, char type, uint32_t id);
ssize_t mux_read(struct mux_in *in, int fd);
/* Pure: each complete frame in `in` to `fn`; -1 at a frame longer than
 * MUX_MAX_PAYLOAD (a protocol error: the frames before it were handed on). */
int mux_dispatch(struct mux_in *in, mux_frame_fn *fn, void *arg);

/* Bytes from the host waiting for a local fd to take them. */
struct outq {
	char *buf;
	size_t len, off;
};
int outq_push(struct outq *q, const char *data, size_t len);
int outq_flush(struct outq *q, int fd);
size_t outq_pending(const struct outq *q);
void outq_free(struct outq *q);

/* ---- X11 and exec ports (x11.c, exec.c) ------------------------------------ */

#define MAX_X11 64
#define X11_POLLFDS (2 + MAX_X11)
#define EXEC_POLLFDS (1 + 3 * MAX_EXEC)

void x11_setup(int display, int xpra, uid_t uid, gid_t gid);
int x11_pollfds(struct pollfd *pfd);
void x11_events(const struct pollfd *pfd, int n);

void exec_setup(const struct spec *s, int port);
int exec_pollfds(struct pollfd *pfd);
void exec_events(const struct pollfd *pfd);
void exec_reaped(pid_t pid, int status);

#endif
