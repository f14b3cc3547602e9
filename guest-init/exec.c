/* `sandbox exec`: more processes beside the command, as its user, in its
 * environment, each multiplexed over the exec port (frames in protocol.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "init.h"

struct xproc {
	uint32_t id;
	pid_t pid;         /* 0: slot free */
	int in, out, err;  /* our ends of its stdio; -1 once closed */
	struct outq inq;   /* stdin from the host not yet taken by the process */
	int in_eof, exited, status;
};
static struct xproc xprocs[MAX_EXEC];
static int exec_port = -1;
static struct mux_in exec_in; /* partial frame from the host */
static const struct spec *main_spec;

/* What an EXEC_START asks for. */
struct exec_req {
	char **argv, **envp;
	const char *cwd;
	int argc, tty, rows, cols, closed;
};

void exec_setup(const struct spec *s, int port)
{
	main_spec = s;
	exec_port = port;
	set_nonblock(port);
}

static void exec_frame(char type, uint32_t id, const char *data, uint32_t len)
{
	mux_send(exec_port, type, id, data, len);
}

static void exec_close_in(struct xproc *x)
{
	if (x->in >= 0)
		close(x->in);
	x->in = -1;
	outq_free(&x->inq);
}

/* The records of an EXEC_START (NUL-terminated, p[len - 1] == 0) into r,
 * whose argv and envp point into p; the given environment comes before
 * the command's own: getenv finds the first. */
static void exec_parse(char *p, uint32_t len, const struct spec *s, struct exec_req *r)
{
	*r = (struct exec_req){.cwd = s->cwd};
	r->argv = calloc(len + 1, sizeof *r->argv);
	r->envp = calloc(len + (size_t)s->envc + 1, sizeof *r->envp);
	if (!r->argv || !r->envp)
		die("out of memory starting an exec");
	int envc = 0;
	for (char *q = p; q < p + len; q += strlen(q) + 1) {
		if (*q == 'A')
			r->argv[r->argc++] = q + 1;
		else if (*q == 'E')
			r->envp[envc++] = q + 1;
		else if (*q == 'C')
			r->cwd = q + 1;
		else if (*q == 'T')
			r->tty = 1;
		else if (*q == 'R')
			r->rows = atoi(q + 1);
		else if (*q == 'W')
			r->cols = atoi(q + 1);
		else if (*q == 'F')
			r->closed = atoi(q + 1);
	}
	for (int i = 0; i < s->envc; i++)
		r->envp[envc++] = s->envp[i];
}

/* Why a process could not start, on its own stderr, as the host words it
 * for the command (sandbox/diagnostics.py). */
static void exec_failed(int fd, const struct exec_error *e, const struct exec_req *r, uid_t uid)
{
	const char *why = strerror(e->err);
	if (e->stage == EXEC_STAGE_CREDS)
		dprintf(fd, "sandbox: exec: cannot become uid %u: %s\n", (unsigned)uid, why);
	else if (e->stage == EXEC_STAGE_CWD)
		dprintf(fd, "sandbox: exec: %s: %s\n", r->cwd ? r->cwd : "/", why);
	else if (e->stage == EXEC_STAGE_RLIMIT)
		dprintf(fd, "sandbox: exec: cannot apply the resource limits: %s\n", why);
	else
		dprintf(fd, "sandbox: %s: %s\n", r->argv[0], e->err == ENOENT ? "command not found" : why);
}

/* Fork and exec r into slot x; its exit status follows once it ends. */
static void exec_launch(struct xproc *x, uint32_t id, const struct exec_req *r)
{
	const struct spec *s = main_spec;
	struct proc p = {.s = s, .argv = r->argv, .envp = r->envp, .cwd = r->cwd, .closed = r->closed};
	struct child c;
	struct exec_error e;
	/* -t: one terminal for all three, its size the client's. */
	child_stdio(&c, &p, r->tty ? TTY_STDIN | TTY_STDOUT | TTY_STDERR : 0, r->rows, r->cols, "exec ");
	pid_t pid = proc_start(&p, &e);
	/* Said through its own stderr, so that it comes before its exit status. */
	if (pid > 0 && e.stage >= 0 && !(p.closed & (1 << 2)))
		exec_failed(p.fds[2], &e, r, s->uid);
	proc_close_ends(&p);
	if (pid < 0) {
		int ours[] = {c.pty, c.in_w, c.out_r, c.err_r};
		for (int i = 0; i < 4; i++)
			if (ours[i] >= 0)
				close(ours[i]);
		exec_frame(EXEC_EXIT, id, "125", 3);
		return;
	}
	*x = (struct xproc){.id = id, .pid = pid, .err = c.err_r};
	x->in = c.pty >= 0 ? c.pty : c.in_w;
	x->out = c.pty >= 0 ? dup(c.pty) : c.out_r;
	set_nonblock(x->in);
}

/* Start one process as the command's user, in its environment and directory. */
static void exec_start(uint32_t id, char *p, uint32_t len)
{
	struct xproc *x = NULL;
	for (int i = 0; i < MAX_EXEC && !x; i++)
		if (!xprocs[i].pid)
			x = &xprocs[i];
	struct exec_req r;
	exec_parse(p, len, main_spec, &r);
	if (!x || !r.argc) {
		const char *why = x ? "sandbox: exec: no command\n" : "sandbox: exec: too many processes at once\n";
		exec_frame(EXEC_STDERR, id, why, (uint32_t)strlen(why));
		exec_frame(EXEC_EXIT, id, "125", 3);
	} else {
		exec_launch(x, id, &r);
	}
	free(r.argv);
	free(r.envp);
}

static struct xproc *exec_find(uint32_t id)
{
	for (int i = 0; i < MAX_EXEC; i++)
		if (xprocs[i].pid && xprocs[i].id == id)
			return &xprocs[i];
	return NULL;
}

static void exec_flush_in(struct xproc *x)
{
	if (x->in < 0)
		return;
	if (outq_flush(&x->inq, x->in) < 0)
		exec_close_in(x); /* it closed its stdin: the rest is dropped, as a pipe would */
	else if (!outq_pending(&x->inq) && x->in_eof)
		exec_close_in(x);
}

static void exec_frame_in(void *arg, char type, uint32_t id, char *data, uint32_t len)
{
	(void)arg;
	if (type == EXEC_START) {
		if (len)
			data[len - 1] = 0; /* the records end inside the frame */
		exec_start(id, data, len);
		return;
	}
	struct xproc *x = exec_find(id);
	if (x && type == EXEC_STDIN && x->in >= 0) {
		if (outq_push(&x->inq, data, len) != 0)
			die("out of memory for exec input");
		exec_flush_in(x);
	} else if (x && type == EXEC_STDIN_EOF) {
		x->in_eof = 1;
		exec_flush_in(x);
	} else if (x && type == EXEC_SIGNAL) {
		char num[16];
		snprintf(num, sizeof num, "%.*s", (int)(len < 15 ? len : 15), data);
		kill(-x->pid, atoi(num));
	}
}

static void exec_frames_from_host(void)
{
	if (mux_read(&exec_in, exec_port) <= 0)
		return;
	if (mux_dispatch(&exec_in, exec_frame_in, NULL) < 0)
		die("exec frame too long");
}

/* Output of one process to the host, until its end. */
static void exec_output(struct xproc *x, int *fd, char type)
{
	if (mux_relay(exec_port, *fd, type, x->id) < 0) {
		close(*fd);
		*fd = -1;
	}
}

void exec_reaped(pid_t pid, int status)
{
	for (int i = 0; i < MAX_EXEC; i++)
		if (xprocs[i].pid == pid) {
			xprocs[i].exited = 1;
			xprocs[i].status = child_status_code(status);
		}
}

/* Its exit status once all of its output went. */
static void exec_finish_done(void)
{
	for (int i = 0; i < MAX_EXEC; i++) {
		struct xproc *x = &xprocs[i];
		if (x->pid && x->exited && x->out < 0 && x->err < 0) {
			char num[16];
			int len = snprintf(num, sizeof num, "%d", x->status);
			exec_frame(EXEC_EXIT, x->id, num, (uint32_t)len);
			exec_close_in(x);
			x->pid = 0;
		}
	}
}

/* The port, then each slot's stdout, stderr and stdin (-1 where idle):
 * EXEC_POLLFDS entries, always at the same places. */
int exec_pollfds(struct pollfd *pfd)
{
	int np = 0;
	pfd[np++] = (struct pollfd){exec_port, POLLIN, 0};
	for (int i = 0; i < MAX_EXEC; i++) {
		struct xproc *x = &xprocs[i];
		pfd[np++] = (struct pollfd){x->pid ? x->out : -1, POLLIN, 0};
		pfd[np++] = (struct pollfd){x->pid ? x->err : -1, POLLIN, 0};
		pfd[np++] = (struct pollfd){x->pid && outq_pending(&x->inq) ? x->in : -1, POLLOUT, 0};
	}
	return np;
}

void exec_events(const struct pollfd *pfd)
{
	if (pfd[0].revents & POLLIN)
		exec_frames_from_host();
	for (int i = 0; i < MAX_EXEC; i++) {
		struct xproc *x = &xprocs[i];
		const struct pollfd *e = &pfd[1 + 3 * i];
		if (!x->pid)
			continue;
		if (e[0].revents && x->out >= 0)
			exec_output(x, &x->out, EXEC_STDOUT);
		if (e[1].revents && x->err >= 0)
			exec_output(x, &x->err, EXEC_STDERR);
		if (e[2].revents)
			exec_flush_in(x);
	}
	exec_finish_done();
}
