/* The init's steps, from boot to power-off, and the event loop that relays
 * the command's stdio, the host's control lines, X11 and `sandbox exec`
 * while the command runs. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>
#include <x86intrin.h>

#include "init.h"

/* The command's run, as the event loop sees it. */
struct run {
	const struct spec *s;
	struct child c;
	struct pump pumps[3]; /* [1], [2] are indexed by the host fd they feed ("P 1", "P 2") */
	int in_port, out_port, err_port;
	int sfd; /* SIGCHLD */
	int exited, status;
};

/* Where each part of the poll set starts (see poll_set). */
enum { POLL_CTL, POLL_SIGNAL, POLL_DNS, POLL_PUMPS };
#define POLLFDS (POLL_PUMPS + 3 + EXEC_POLLFDS + X11_POLLFDS)
struct poll_at {
	int pump[3]; /* -1: that pump waits for nothing */
	int exec, x11, n;
};

/* ---- boot ---------------------------------------------------------------- */

/* Up to "ready": what every run does alike, done before a template is taken. */
static void boot(sigset_t *chld)
{
	uint64_t t0 = now_ns(), tsc = __rdtsc();
	ctl_send("T init_start %llu", (unsigned long long)t0);
	/* The TSC counts from vCPU reset: it dates kernel entry (timings.py). */
	ctl_send("T tsc %llu", (unsigned long long)tsc);
	sigemptyset(chld);
	sigaddset(chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, chld, NULL);
	signal(SIGPIPE, SIG_IGN);

	mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "");
	load_modules();
	stamp("modules_loaded");

	ctl_open();
	/* (Under TCG this saved no measurable time: what these cost after a
	 * restore was mostly translating kernel paths that the run goes
	 * through anyway; benchmarks/README.md.)  Not the data ports: QEMU
	 * moves a port's host data into guest buffers only once the guest
	 * has it open, and data that came in before the template was taken
	 * (an early `sandbox exec`'s stdin) would be in the template. */
	loopback_up();
	early_mounts();
}

/* The spec, and what makes a restored guest this run's; returns when
 * "spec_read" was stamped (the host's clock answers it). */
static uint64_t receive_spec(struct spec *s)
{
	read_spec(s);
	reseed(s->entropy);
	set_realtime(s->realtime_ns);
	uint64_t spec_read = now_ns();
	ctl_send("T spec_read %llu", (unsigned long long)spec_read);
	return spec_read;
}

static void open_ports(struct run *r)
{
	r->in_port = open_port(PORT_STDIN, O_RDONLY, 2000);
	r->out_port = open_port(PORT_STDOUT, O_WRONLY, 2000);
	r->err_port = open_port(PORT_STDERR, O_WRONLY, 2000);
	int exec_port = open_port(PORT_EXEC, O_RDWR, 2000);
	if (r->in_port < 0 || r->out_port < 0 || r->err_port < 0 || exec_port < 0)
		die("stdio ports did not appear");
	exec_setup(r->s, exec_port);
}

/* The sandbox's name, as a container gets its own: prompts, logs and
 * `hostname` say which sandbox this is (the kernel's is "(none)"). */
static void set_hostname(const char *name)
{
	if (!name)
		return;
	size_t len = strlen(name);
	if (len > HOSTNAME_MAX)
		die("host name '%s' is longer than %d bytes", name, HOSTNAME_MAX);
	if (sethostname(name, len) != 0)
		die("sethostname %s: %s", name, strerror(errno));
}

/* The sandbox around the command: network, filesystems, X11, the clock. */
static void prepare(const struct spec *s, uint64_t spec_read)
{
	struct netcfg net;
	net_start(s, &net);
	setup_root(s);
	set_hostname(s->hostname);
	if (!s->net)
		dns_setup();
	if (s->x11)
		x11_setup(s->x11 - 1, s->xpra, s->uid, s->gid);
	sync_clock(spec_read);
	net_wait(s, &net);
}

/* ---- the command's stdio ------------------------------------------------- */

static void start_pumps(struct run *r)
{
	const struct child *c = &r->c;
	struct pump *p = r->pumps;
	int tty = r->s->tty;
	if (c->pty >= 0) {
		int pty_in = tty & TTY_STDIN;
		pump_init(&p[0], pty_in ? r->in_port : -1, pty_in ? c->pty : -1, 0);
		int pty_out = (tty & TTY_STDOUT) ? 1 : 2;
		pump_init(&p[pty_out], c->pty, pty_out == 1 ? r->out_port : r->err_port, 0);
	}
	if (c->in_w >= 0)
		pump_init(&p[0], r->in_port, c->in_w, 1);
	if (c->out_r >= 0)
		pump_init(&p[1], c->out_r, r->out_port, 0);
	if (c->err_r >= 0)
		pump_init(&p[2], c->err_r, r->err_port, 0);
	if (c->pty >= 0 && (tty & (TTY_STDOUT | TTY_STDERR)) == (TTY_STDOUT | TTY_STDERR))
		pump_init(&p[2], -1, -1, 0);
	if (!(tty & TTY_STDIN) && c->in_w < 0)
		pump_init(&p[0], -1, -1, 0);
	if (r->exited) /* it never started */
		for (int i = 0; i < 3; i++)
			pump_init(&p[i], -1, -1, 0);
}

/* ---- lines from the host ------------------------------------------------- */

/* One control line while the command runs; 1 once the host acked ("A"). */
static int host_line(char *line, void *arg)
{
	struct run *r = arg;
	struct child *c = &r->c;
	int a, b;
	long long eof_at;
	if (sscanf(line, "K %d", &a) == 1 && c->pid > 0) {
		kill(-c->pid, a);
	} else if (sscanf(line, "W %d %d", &a, &b) == 2 && c->pty >= 0) {
		struct winsize ws = {(unsigned short)a, (unsigned short)b, 0, 0};
		ioctl(c->pty, TIOCSWINSZ, &ws);
	} else if (sscanf(line, "P %d", &a) == 1 && (a == 1 || a == 2)) {
		/* The host's reader is gone: the command now gets EPIPE. */
		struct pump *p = &r->pumps[a];
		if (p->src >= 0 && p->src != c->pty) {
			close(p->src);
			p->src = -1;
		}
		pump_finish(p);
	} else if (line[0] == 'I' && sscanf(line, "I %lld", &eof_at) == 1 && eof_at >= 0) {
		/* stdin ends after this many bytes: a backend whose port
		 * cannot be half-closed (libvirt's streams) says so here. */
		r->pumps[0].limit = eof_at;
		pump_run(&r->pumps[0]);
	} else if (line[0] == 'A') {
		return 1;
	}
	return 0;
}

/* Read what the control port has, then handle its complete lines. */
static int handle_ctl(struct run *r)
{
	if (!ctl_read())
		return 0;
	return ctl_lines(host_line, r);
}

/* ---- the event loop ------------------------------------------------------ */

static void poll_set(struct run *r, struct pollfd *pfd, struct poll_at *at)
{
	int np = 0;
	pfd[np++] = (struct pollfd){ctl_fd, POLLIN, 0};
	pfd[np++] = (struct pollfd){r->sfd, POLLIN, 0};
	pfd[np++] = (struct pollfd){dns_socket(), POLLIN, 0}; /* -1: ignored */
	for (int i = 0; i < 3; i++)
		at->pump[i] = pump_poll(&r->pumps[i], &pfd[np]) ? np++ : -1;
	at->exec = np;
	np += exec_pollfds(&pfd[np]);
	at->x11 = np;
	np += x11_pollfds(&pfd[np]);
	at->n = np;
}

/* The command is gone: take what it left in the pipes, but do not wait
 * for EOF that a stray background process may hold off forever.  Returns
 * 1 once its output is all out. */
static int drained(struct run *r)
{
	int moved = 0;
	for (int i = 1; i < 3; i++)
		moved |= pump_run(&r->pumps[i]);
	if (moved)
		return 0;
	for (int i = 1; i < 3; i++)
		if (r->pumps[i].len == r->pumps[i].off)
			pump_finish(&r->pumps[i]);
	return !pump_active(&r->pumps[1]) && !pump_active(&r->pumps[2]);
}

/* SIGCHLD: the command's end, or an exec process's. */
static void reap(struct run *r)
{
	struct signalfd_siginfo si;
	while (read(r->sfd, &si, sizeof si) > 0)
		;
	int st;
	pid_t p;
	while ((p = waitpid(-1, &st, WNOHANG)) > 0)
		if (p == r->c.pid && !r->exited) {
			r->exited = 1;
			r->status = child_status_code(st);
			stamp("command_exit");
		} else {
			exec_reaped(p, st);
		}
}

static void dispatch(struct run *r, const struct pollfd *pfd, const struct poll_at *at)
{
	if (pfd[POLL_CTL].revents)
		handle_ctl(r);
	if (pfd[POLL_DNS].revents & POLLIN)
		dns_answer();
	if (pfd[POLL_SIGNAL].revents & POLLIN)
		reap(r);
	for (int i = 0; i < 3; i++)
		if (at->pump[i] >= 0 && pfd[at->pump[i]].revents)
			pump_run(&r->pumps[i]);
	exec_events(&pfd[at->exec]);
	x11_events(&pfd[at->x11], at->n - at->x11);
}

/* Until the command has exited and its output is out. */
static void relay(struct run *r)
{
	/* Lines that came in with the clock's reply (a resize sent right
	 * after the spec) wait in the control buffer: not for the next read. */
	ctl_lines(host_line, r);
	while (!r->exited || pump_active(&r->pumps[1]) || pump_active(&r->pumps[2])) {
		struct pollfd pfd[POLLFDS];
		struct poll_at at;
		poll_set(r, pfd, &at);
		if (r->exited && drained(r))
			break;
		if (poll(pfd, (nfds_t)at.n, r->exited ? 10 : -1) < 0 && errno != EINTR)
			die("poll: %s", strerror(errno));
		dispatch(r, pfd, &at);
	}
}

/* ---- the end ------------------------------------------------------------- */

/* How many bytes of stdin the command took (TTY_STDIN_FILE), -1 when not
 * counted: what went into its pipe, less what is still unread there. */
static long long stdin_taken(const struct run *r)
{
	int unread = 0;
	if (r->c.in_keep < 0 || ioctl(r->c.in_keep, FIONREAD, &unread) != 0 || unread < 0)
		return -1;
	unsigned long long put = r->pumps[0].count;
	return put >= (unsigned long long)unread ? (long long)(put - (unsigned long long)unread) : -1;
}

static _Noreturn void finish(struct run *r, unsigned long ooms)
{
	unsigned long killed = oom_kills() - ooms;
	if (killed)
		ctl_send("O %lu", killed);
	ctl_send("S %d %llu %llu %lld", r->status, r->pumps[1].count, r->pumps[2].count, stdin_taken(r));
	/* Wait for the host to confirm it has every byte: QEMU drops what is
	 * still queued when the machine powers off. */
	set_nonblock(ctl_fd);
	uint64_t deadline = now_ns() + 30000000000ull;
	while (now_ns() < deadline) {
		struct pollfd pfd = {ctl_fd, POLLIN, 0};
		poll(&pfd, 1, 1000);
		if (handle_ctl(r))
			break;
	}
	/* Shared directories' writes reach the host before the last word:
	 * the host may end the machine as soon as it hears "poweroff". */
	if (r->s->rw_share)
		sync();
	stamp("poweroff");
	power_off();
}

int main(void)
{
	static struct spec s;
	struct run r = {.s = &s};
	sigset_t chld;
	boot(&chld);
	/* Nothing of the run has entered the guest yet: a template is taken
	 * here (sandbox/qemu/template.py), and restored guests resume here. */
	stamp("ready");
	uint64_t spec_read = receive_spec(&s);
	open_ports(&r);
	prepare(&s, spec_read);
	unsigned long ooms = oom_kills();
	r.status = spawn(&s, &r.c);
	r.exited = r.status != 0;
	r.sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
	start_pumps(&r);
	relay(&r);
	finish(&r, ooms);
}
