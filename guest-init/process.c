/* Starting a process as the command's user: the command itself (spawn) and
 * each `sandbox exec` process (exec.c) go through one child set-up, whose
 * every failure comes back to the parent as a stage and an errno. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "init.h"

extern char **environ;

/* A pty for a process, its size and owner the user's; returns the master. */
static int open_pty(int rows, int cols, uid_t uid, int *slave, const char *who)
{
	int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (master < 0 || grantpt(master) || unlockpt(master))
		die("%spty: %s", who, strerror(errno));
	*slave = open(ptsname(master), O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (*slave < 0)
		die("%spty slave: %s", who, strerror(errno));
	if (rows && cols) {
		struct winsize ws = {(unsigned short)rows, (unsigned short)cols, 0, 0};
		ioctl(master, TIOCSWINSZ, &ws);
	}
	if (fchown(*slave, uid, (gid_t)-1) != 0)
		die("%spty chown: %s", who, strerror(errno));
	return master;
}

/* The streams of the `tty` mask (TTY_* bits) on one pty, the others on
 * pipes: the child's ends in p->fds (p->ctty the pty's slave), ours in c.
 * `who` prefixes fatal errors. */
void child_stdio(struct child *c, struct proc *p, int tty, int rows, int cols, const char *who)
{
	int *ours[3] = {&c->in_w, &c->out_r, &c->err_r};
	c->in_w = c->out_r = c->err_r = c->pty = p->ctty = c->in_keep = -1;
	if (tty & (TTY_STDIN | TTY_STDOUT | TTY_STDERR))
		c->pty = open_pty(rows, cols, p->s->uid, &p->ctty, who);
	for (int i = 0; i < 3; i++) {
		int pp[2];
		if (tty & (1 << i)) { /* TTY_STDIN, TTY_STDOUT, TTY_STDERR */
			p->fds[i] = p->ctty;
			continue;
		}
		if (pipe2(pp, O_CLOEXEC))
			die("pipe");
		p->fds[i] = i ? pp[1] : pp[0];
		*ours[i] = i ? pp[0] : pp[1];
		if (i == 0 && (tty & TTY_STDIN_FILE))
			c->in_keep = fcntl(pp[0], F_DUPFD_CLOEXEC, 3);
	}
}

/* The child's ends, in the parent once it started (or failed to). */
void proc_close_ends(const struct proc *p)
{
	for (int i = 0; i < 3; i++)
		if (p->fds[i] != p->ctty)
			close(p->fds[i]);
	if (p->ctty >= 0)
		close(p->ctty);
}

static _Noreturn void child_fail(int errpipe, int stage, int code)
{
	struct exec_error e = {stage, errno};
	write(errpipe, &e, sizeof e);
	_exit(code);
}

/* In the child: its stdio, session, limits, user, umask and directory, then exec. */
static _Noreturn void child_run(const struct proc *p, int errpipe)
{
	const struct spec *s = p->s;
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	/* init ignores SIGPIPE for itself; an ignored signal survives exec, and
	 * `cmd | head` must end cmd by SIGPIPE as it would on the host. */
	signal(SIGPIPE, SIG_DFL);
	setsid();
	if (p->ctty >= 0)
		ioctl(p->ctty, TIOCSCTTY, 0);
	/* No stage for these: stdio cannot be trusted to say why, and the
	 * host reports the status (125) all the same. */
	for (int i = 0; i < 3; i++)
		if (dup2(p->fds[i], i) < 0)
			_exit(125);
	/* `cmd >&-` on the host (or for `sandbox exec`): the process finds that
	 * fd closed (EBADF), not a pipe to nowhere. */
	for (int i = 0; i < 3; i++)
		if (p->closed & (1 << i))
			close(i);
	/* The host's limits, the stack's first: it sets how much argv and
	 * environment execve takes, and the host's execve took all of it. */
	for (int i = 0; i < s->nrlims; i++)
		if (setrlimit(s->rlims[i].resource, &s->rlims[i].lim) != 0)
			child_fail(errpipe, EXEC_STAGE_RLIMIT, 125);
	if (setgroups((size_t)s->ngroups, s->groups) || setgid(s->gid) || setuid(s->uid))
		child_fail(errpipe, EXEC_STAGE_CREDS, 125);
	umask(s->umask);
	if (chdir(p->cwd ? p->cwd : "/") != 0)
		child_fail(errpipe, EXEC_STAGE_CWD, 125);
	environ = p->envp; /* execvpe searches the PATH of environ */
	execvpe(p->argv[0], p->argv, p->envp);
	child_fail(errpipe, EXEC_STAGE_EXEC, errno == ENOENT ? 127 : 126);
}

/* Fork `p` and wait until it exec'd (the error pipe closes on exec) or
 * failed (*fail: the stage and errno; stage -1 when it runs).  Returns its
 * pid, or -1 if fork failed (errno). */
pid_t proc_start(const struct proc *p, struct exec_error *fail)
{
	int ep[2];
	if (pipe2(ep, O_CLOEXEC))
		die("pipe");
	pid_t pid = fork();
	if (pid == 0)
		child_run(p, ep[1]);
	int fork_errno = errno;
	close(ep[1]);
	fail->stage = -1;
	fail->err = 0;
	if (pid > 0) {
		struct exec_error e;
		ssize_t n;
		do
			n = read(ep[0], &e, sizeof e);
		while (n < 0 && errno == EINTR);
		if (n == (ssize_t)sizeof e)
			*fail = e;
	}
	close(ep[0]);
	errno = fork_errno;
	return pid;
}

/* The status a process that could not start ends with (as a shell's). */
int exec_error_code(const struct exec_error *e)
{
	return e->stage != EXEC_STAGE_EXEC ? 125 : e->err == ENOENT ? 127 : 126;
}

/* Start the command; returns 0, or an exit code (125-127) on failure. */
int spawn(const struct spec *s, struct child *c)
{
	struct proc p = {.s = s, .argv = s->argv, .envp = s->envp, .cwd = s->cwd, .closed = s->closed};
	struct exec_error e;
	child_stdio(c, &p, s->tty, s->rows, s->cols, "");
	stamp("command_exec");
	c->pid = proc_start(&p, &e);
	if (c->pid < 0)
		die("fork: %s", strerror(errno));
	proc_close_ends(&p);
	if (e.stage < 0)
		return 0;
	/* The host words the message: it has the command's name unmangled. */
	int code = exec_error_code(&e);
	ctl_send("X %d %d %d", code, e.err, e.stage);
	return code;
}

int child_status_code(int st)
{
	if (WIFEXITED(st))
		return WEXITSTATUS(st);
	if (WIFSIGNALED(st))
		return 128 + WTERMSIG(st);
	return 255;
}
