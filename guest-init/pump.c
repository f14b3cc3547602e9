/* The command's stdio relays: each a pump from one fd to another, moving
 * what it can without blocking, driven by the event loop's poll. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#include "init.h"

void pump_init(struct pump *p, int src, int dst, int close_dst)
{
	p->src = src;
	p->dst = dst;
	p->buf = src >= 0 && dst >= 0 ? malloc(BUFSZ) : NULL;
	p->len = p->off = 0;
	p->eof = src < 0 || dst < 0;
	p->count = 0;
	p->close_dst = close_dst;
	p->limit = -1;
	p->rcount = 0;
	if (src >= 0)
		set_nonblock(src);
	if (dst >= 0)
		set_nonblock(dst);
}

int pump_active(const struct pump *p)
{
	return !p->eof || p->len > p->off;
}

void pump_finish(struct pump *p)
{
	p->eof = 1;
	p->len = p->off = 0;
	if (p->close_dst && p->dst >= 0) {
		close(p->dst);
		p->dst = -1;
	}
}

/* Move what can move without blocking; returns 1 if any byte moved. */
int pump_run(struct pump *p)
{
	int moved = 0;
	for (;;) {
		if (p->len > p->off) {
			ssize_t w = write(p->dst, p->buf + p->off, p->len - p->off);
			if (w < 0) {
				if (errno == EAGAIN || errno == EINTR)
					return moved;
				pump_finish(p); /* reader gone (EPIPE): drop the rest */
				return 1;
			}
			p->off += (size_t)w;
			p->count += (unsigned long long)w;
			moved = 1;
			continue;
		}
		if (p->eof) {
			if (p->close_dst && p->dst >= 0)
				pump_finish(p);
			return moved;
		}
		if (p->limit >= 0 && p->rcount >= (unsigned long long)p->limit) {
			p->eof = 1; /* all the host sent: its EOF, whether or not the port ever closes */
			continue;
		}
		ssize_t r = read(p->src, p->buf, BUFSZ);
		if (r < 0 && (errno == EAGAIN || errno == EINTR))
			return moved;
		if (r <= 0) { /* EOF, or EIO from a pty whose slave closed */
			p->eof = 1;
			continue;
		}
		p->rcount += (unsigned long long)r;
		p->len = (size_t)r;
		p->off = 0;
		moved = 1;
	}
}

/* What the pump waits for: 1 with pfd set, 0 if nothing. */
int pump_poll(const struct pump *p, struct pollfd *pfd)
{
	if (p->len > p->off) {
		pfd->fd = p->dst;
		pfd->events = POLLOUT;
		return 1;
	}
	if (!p->eof) {
		pfd->fd = p->src;
		pfd->events = POLLIN;
		return 1;
	}
	return 0;
}
