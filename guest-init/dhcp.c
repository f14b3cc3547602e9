/* DHCP (IPv4 on a bridge: the LAN's server assigns the address): a
 * DISCOVER, the first OFFER REQUESTed, its ACK; the messages are built and
 * parsed by pure functions (tests/init_units.c). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include "init.h"

#define OPT_PAD 0
#define OPT_MASK 1
#define OPT_ROUTER 3
#define OPT_DNS 6
#define OPT_REQUESTED_ADDR 50
#define OPT_TYPE 53
#define OPT_SERVER 54
#define OPT_PARAMS 55
#define OPT_END 255

static const uint8_t magic[4] = {99, 130, 83, 99};

size_t dhcp_request(struct dhcp_msg *m, const unsigned char hw[6], uint32_t xid, int type, const struct dhcp_lease *offer)
{
	memset(m, 0, sizeof *m);
	m->op = 1, m->htype = 1, m->hlen = 6, m->xid = xid, m->flags = htons(0x8000); /* answer by broadcast */
	memcpy(m->chaddr, hw, 6);
	memcpy(m->magic, magic, 4);
	uint8_t *o = m->options;
	*o++ = OPT_TYPE, *o++ = 1, *o++ = (uint8_t)type;
	if (offer) {
		*o++ = OPT_REQUESTED_ADDR, *o++ = 4, memcpy(o, &offer->addr, 4), o += 4;
		*o++ = OPT_SERVER, *o++ = 4, memcpy(o, &offer->server, 4), o += 4;
	}
	*o++ = OPT_PARAMS, *o++ = 3, *o++ = OPT_MASK, *o++ = OPT_ROUTER, *o++ = OPT_DNS;
	*o++ = OPT_END;
	return (size_t)(o - (uint8_t *)m);
}

/* One option's value into the lease; returns the message type for OPT_TYPE, else -1. */
static int dhcp_option(uint8_t code, const uint8_t *v, size_t len, struct dhcp_lease *l)
{
	if (code == OPT_TYPE && len == 1)
		return v[0];
	if (code == OPT_SERVER && len == 4)
		memcpy(&l->server, v, 4);
	else if (code == OPT_MASK && len == 4)
		memcpy(&l->mask, v, 4);
	else if (code == OPT_ROUTER && len >= 4)
		memcpy(&l->router, v, 4);
	else if (code == OPT_DNS)
		for (size_t i = 0; i + 4 <= len && l->ndns < 3; i += 4) {
			struct in_addr a;
			memcpy(&a, v + i, 4);
			snprintf(l->dns[l->ndns++], sizeof l->dns[0], "%s", inet_ntoa(a));
		}
	return -1;
}

int dhcp_parse(const struct dhcp_msg *m, size_t n, const unsigned char hw[6], uint32_t xid, struct dhcp_lease *l)
{
	if (n < offsetof(struct dhcp_msg, options) || n > sizeof *m || m->op != 2 || m->xid != xid || memcmp(m->chaddr, hw, 6))
		return 0;
	int type = 0;
	memset(l, 0, sizeof *l);
	l->addr = m->yiaddr;
	const uint8_t *o = m->options;
	size_t left = n - offsetof(struct dhcp_msg, options); /* bytes from o on */
	while (left && *o != OPT_END) {
		if (*o == OPT_PAD) {
			o++, left--;
			continue;
		}
		if (left < 2 || left - 2 < o[1])
			break; /* an option cut off */
		int t = dhcp_option(o[0], o + 2, o[1], l);
		if (t >= 0)
			type = t;
		left -= 2 + (size_t)o[1];
		o += 2 + o[1];
	}
	return type;
}

int mask_plen(in_addr_t mask)
{
	int plen = 0;
	for (uint32_t m = ntohl(mask ? mask : htonl(0xffffff00)); m & 0x80000000u; m <<= 1)
		plen++;
	return plen;
}

static int dhcp_socket(const struct netcfg *n)
{
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), on = 1;
	struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons(68)};
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_BROADCAST, &on, sizeof on) ||
	    setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, NET_IF, sizeof NET_IF) || bind(fd, (struct sockaddr *)&me, sizeof me))
		die("--net %s: DHCP socket: %s", n->mode, strerror(errno));
	return fd;
}

/* The exchange, resent every second until the deadline; 1 with an ACKed lease. */
int dhcp(const struct netcfg *n, uint64_t deadline, struct dhcp_lease *lease)
{
	int fd = dhcp_socket(n);
	struct sockaddr_in server = {.sin_family = AF_INET, .sin_port = htons(67), .sin_addr.s_addr = INADDR_BROADCAST};
	uint32_t xid;
	if (getrandom(&xid, sizeof xid, 0) != sizeof xid)
		xid = (uint32_t)now_ns();
	struct dhcp_msg m;
	struct dhcp_lease offer;
	int want = DHCP_OFFER; /* an offer, then an ack */
	uint64_t resend = 0;
	while (now_ns() < deadline) {
		if (now_ns() >= resend) {
			size_t len = dhcp_request(&m, n->hw, xid, want == DHCP_OFFER ? DHCP_DISCOVER : DHCP_REQUEST, want == DHCP_OFFER ? NULL : &offer);
			sendto(fd, &m, len, 0, (struct sockaddr *)&server, sizeof server);
			resend = now_ns() + 1000000000ull;
		}
		struct pollfd p = {fd, POLLIN, 0};
		uint64_t until = resend < deadline ? resend : deadline, t = now_ns();
		if (poll(&p, 1, until > t ? (int)((until - t) / 1000000 + 1) : 0) <= 0)
			continue;
		ssize_t got = recv(fd, &m, sizeof m, 0);
		int type = got < 0 ? 0 : dhcp_parse(&m, (size_t)got, n->hw, xid, want == DHCP_OFFER ? &offer : lease);
		if (type == DHCP_OFFER && want == DHCP_OFFER && offer.server) {
			want = DHCP_ACK;
			resend = 0;
		} else if (type == DHCP_ACK && want == DHCP_ACK) {
			close(fd);
			return 1;
		} else if (type == DHCP_NAK) { /* start over */
			want = DHCP_OFFER;
			resend = 0;
		}
	}
	close(fd);
	return 0;
}
