/* A multiplexed port (X11's, exec's; sandbox/mux.py is the host's end):
 * frames of type (1 byte), id (LE32), length (LE32) and payload, both ways.
 * The codec is pure (tests/init_units.c); the host's data for a local fd
 * waits in an outq until the fd takes it. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "init.h"

static void put32(char *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (char)(v >> (8 * i));
}

static uint32_t get32(const char *p)
{
	uint32_t v = 0;
	for (int i = 0; i < 4; i++)
		v |= (uint32_t)(unsigned char)p[i] << (8 * i);
	return v;
}

/* ---- to the host ---------------------------------------------------------- */

void mux_header(char hdr[MUX_HDR], char type, uint32_t id, uint32_t len)
{
	hdr[0] = type;
	put32(hdr + 1, id);
	put32(hdr + 5, len);
}

void mux_send(int port, char type, uint32_t id, const char *data, uint32_t len)
{
	char hdr[MUX_HDR];
	mux_header(hdr, type, id, len);
	write_all(port, hdr, MUX_HDR);
	if (len)
		write_all(port, data, len);
}

/* What `fd` has, as one frame; 1: sent, 0: nothing yet, -1: fd ended (EOF or an error). */
int mux_relay(int port, int fd, char type, uint32_t id)
{
	static char buf[MUX_MAX_PAYLOAD];
	ssize_t n = read(fd, buf, sizeof buf);
	if (n > 0) {
		mux_send(port, type, id, buf, (uint32_t)n);
		return 1;
	}
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return 0;
	return -1;
}

/* ---- from the host -------------------------------------------------------- */

/* Never blocks on a full buffer: it always has room once complete frames
 * are dispatched, since a whole frame fits. */
ssize_t mux_read(struct mux_in *in, int fd)
{
	ssize_t n = read(fd, in->buf + in->len, sizeof in->buf - in->len);
	if (n > 0)
		in->len += (size_t)n;
	return n;
}

int mux_dispatch(struct mux_in *in, mux_frame_fn *fn, void *arg)
{
	size_t off = 0;
	int ret = 0;
	while (in->len - off >= MUX_HDR) {
		char *f = in->buf + off;
		uint32_t id = get32(f + 1), len = get32(f + 5);
		if (len > MUX_MAX_PAYLOAD) {
			ret = -1;
			break;
		}
		if (in->len - off < MUX_HDR + len)
			break;
		fn(arg, f[0], id, f + MUX_HDR, len);
		off += MUX_HDR + len;
	}
	memmove(in->buf, in->buf + off, in->len - off);
	in->len -= off;
	return ret;
}

/* ---- the host's data for a local fd ------------------------------------------ */

/* 0, or -1 out of memory (nothing added). */
int outq_push(struct outq *q, const char *data, size_t len)
{
	if (!len)
		return 0; /* realloc(p, 0) would free p */
	if (q->off) { /* what was written goes first: the queue holds only what waits */
		memmove(q->buf, q->buf + q->off, q->len - q->off);
		q->len -= q->off;
		q->off = 0;
	}
	char *grown = realloc(q->buf, q->len + len);
	if (!grown)
		return -1;
	memcpy(grown + q->len, data, len);
	q->buf = grown;
	q->len += len;
	return 0;
}

/* Write what waits without blocking; -1 on a write error (the reader is
 * gone), else 0, whether or not all of it went. */
int outq_flush(struct outq *q, int fd)
{
	while (q->off < q->len) {
		ssize_t w = write(fd, q->buf + q->off, q->len - q->off);
		if (w < 0)
			return errno == EAGAIN || errno == EINTR ? 0 : -1;
		q->off += (size_t)w;
	}
	q->off = q->len = 0;
	return 0;
}

size_t outq_pending(const struct outq *q)
{
	return q->len - q->off;
}

void outq_free(struct outq *q)
{
	free(q->buf);
	q->buf = NULL;
	q->len = q->off = 0;
}
