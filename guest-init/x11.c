/* X11 over its multiplexed port: --x11, the guest's clients dial a socket
 * here and each connection is bridged to the host's display; --x11=xpra,
 * the host's xpra client dials in and each connection is bridged to the
 * xpra server in the guest. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "init.h"

struct xconn {
	int fd;
	uint32_t id;
	struct outq pend; /* bytes waiting to go to the guest client */
};
static struct xconn xconns[MAX_X11];
static int x11_listen = -1, x11_port = -1, x11_xpra;
static uint32_t x11_next_id = 1;
static struct mux_in x11_in; /* partial frame from the host */

static void x11_frame(char type, uint32_t id, const char *data, uint32_t len)
{
	mux_send(x11_port, type, id, data, len);
}

/* A free slot for a connection's fd, or NULL. */
static struct xconn *x11_slot(int fd, uint32_t id)
{
	for (int i = 0; i < MAX_X11; i++)
		if (xconns[i].fd < 0) {
			xconns[i].fd = fd;
			xconns[i].id = id;
			return &xconns[i];
		}
	return NULL;
}

/* --x11=xpra: the xpra server runs in the guest (started by the command's
 * wrapper, as the user); the host's xpra client opens connections, each
 * bridged here to the server's socket.  The wrapper writes to the ready
 * FIFO once the server says it is ready, and the host then starts its
 * client: an earlier client would time out on a server still starting. */
static void xpra_setup(uid_t uid, gid_t gid)
{
	if (mkdir(XPRA_DIR, 0700) || chown(XPRA_DIR, uid, gid))
		die("%s: %s", XPRA_DIR, strerror(errno));
	if (mkfifo(XPRA_DIR "/ready", 0600) || chown(XPRA_DIR "/ready", uid, gid))
		die("%s/ready: %s", XPRA_DIR, strerror(errno));
	x11_listen = open(XPRA_DIR "/ready", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	if (x11_listen < 0)
		die("%s/ready: %s", XPRA_DIR, strerror(errno));
}

static void xpra_ready(void)
{
	char buf[64];
	if (read(x11_listen, buf, sizeof buf) > 0)
		x11_frame(X11_READY, 0, NULL, 0);
	close(x11_listen);
	x11_listen = -1;
}

static void xpra_open(uint32_t id)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	snprintf(a.sun_path, sizeof a.sun_path, "%s/socket", XPRA_DIR);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a)) {
		if (fd >= 0)
			close(fd);
		x11_frame(X11_CLOSE, id, NULL, 0);
		return;
	}
	set_nonblock(fd);
	if (!x11_slot(fd, id)) {
		close(fd);
		x11_frame(X11_CLOSE, id, NULL, 0);
	}
}

void x11_setup(int display, int xpra, uid_t uid, gid_t gid)
{
	x11_xpra = xpra;
	x11_port = open_port(PORT_X11, O_RDWR, 10000);
	if (x11_port < 0)
		die("no X11 port");
	for (int i = 0; i < MAX_X11; i++)
		xconns[i].fd = -1;
	if (xpra) {
		xpra_setup(uid, gid);
		return;
	}
	mkdir("/tmp/.X11-unix", 01777);
	chmod("/tmp/.X11-unix", 01777);
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	snprintf(a.sun_path, sizeof a.sun_path, "/tmp/.X11-unix/X%d", display);
	unlink(a.sun_path); /* the host's own display socket shows through /tmp */
	x11_listen = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (x11_listen < 0 || bind(x11_listen, (struct sockaddr *)&a, sizeof a) || listen(x11_listen, 16))
		die("X11 socket: %s", strerror(errno));
	chmod(a.sun_path, 0777);
}

static struct xconn *x11_find(uint32_t id)
{
	for (int i = 0; i < MAX_X11; i++)
		if (xconns[i].fd >= 0 && xconns[i].id == id)
			return &xconns[i];
	return NULL;
}

static void x11_drop(struct xconn *x, int tell_host)
{
	if (tell_host)
		x11_frame(X11_CLOSE, x->id, NULL, 0);
	close(x->fd);
	x->fd = -1;
	outq_free(&x->pend);
}

static void x11_accept(void)
{
	int fd = accept4(x11_listen, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
	if (fd < 0)
		return;
	struct xconn *x = x11_slot(fd, x11_next_id);
	if (!x) {
		close(fd);
		return;
	}
	x11_next_id++;
	x11_frame(X11_OPEN, x->id, NULL, 0);
}

static void x11_client_to_host(struct xconn *x)
{
	if (mux_relay(x11_port, x->fd, X11_DATA, x->id) < 0)
		x11_drop(x, 1);
}

static void x11_flush(struct xconn *x)
{
	if (outq_flush(&x->pend, x->fd) < 0)
		x11_drop(x, 1);
}

static void x11_frame_in(void *arg, char type, uint32_t id, char *data, uint32_t len)
{
	(void)arg;
	struct xconn *x = x11_find(id);
	if (x && type == X11_DATA) {
		if (outq_push(&x->pend, data, len) == 0)
			x11_flush(x);
	} else if (x && type == X11_CLOSE) {
		x11_drop(x, 0);
	} else if (!x && type == X11_OPEN && x11_xpra) {
		xpra_open(id);
	}
}

/* Frames from the host; returns -1 when the host side went away. */
static int x11_host_to_client(void)
{
	ssize_t n = mux_read(&x11_in, x11_port);
	if (n == 0) {
		/* virtio-console reads EOF while the guest has not yet taken in
		 * that the host side is connected (a control message that can
		 * trail the port's appearance), as well as after the host left,
		 * and then the VM goes too: never a reason to drop the display. */
		usleep(2000);
		return 0;
	}
	if (n < 0)
		return (errno != EAGAIN && errno != EINTR) ? -1 : 0;
	return mux_dispatch(&x11_in, x11_frame_in, NULL);
}

/* The port, the listening socket (or xpra's ready FIFO) and each
 * connection, into pfd; returns how many (none without X11). */
int x11_pollfds(struct pollfd *pfd)
{
	int np = 0;
	if (x11_port < 0)
		return 0;
	pfd[np++] = (struct pollfd){x11_port, POLLIN, 0};
	pfd[np++] = (struct pollfd){x11_listen, POLLIN, 0};
	for (int i = 0; i < MAX_X11; i++)
		if (xconns[i].fd >= 0)
			pfd[np++] = (struct pollfd){xconns[i].fd, (short)(outq_pending(&xconns[i].pend) ? POLLOUT : POLLIN), 0};
	return np;
}

/* The display went away: clients see their connections end. */
static void x11_close(void)
{
	for (int i = 0; i < MAX_X11; i++)
		if (xconns[i].fd >= 0)
			x11_drop(&xconns[i], 0);
	close(x11_port);
	x11_port = -1;
}

/* What poll found on the n entries of x11_pollfds. */
void x11_events(const struct pollfd *pfd, int n)
{
	if (x11_port < 0 || n == 0)
		return;
	if (pfd[0].revents && x11_host_to_client() < 0) {
		x11_close();
		return;
	}
	if (pfd[1].revents) {
		if (x11_xpra)
			xpra_ready();
		else
			x11_accept();
	}
	for (int i = 2; i < n; i++) {
		struct xconn *x = NULL;
		for (int j = 0; j < MAX_X11; j++)
			if (xconns[j].fd == pfd[i].fd)
				x = &xconns[j];
		if (!x || !pfd[i].revents)
			continue;
		if (outq_pending(&x->pend))
			x11_flush(x);
		else
			x11_client_to_host(x);
	}
}
