/* Name resolution in the guest: its own resolv.conf, and for a guest with
 * no network a resolver on 127.0.0.1:53 that refuses every lookup. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "init.h"

/* ---- resolv.conf ---------------------------------------------------------- */

/* The guest's own resolv.conf, bind-mounted over the host's (or where its
 * symlink points).  No network: lookups go to the init's own refusing
 * resolver (dns_answer), so they fail at once instead of timing out against
 * the host's servers.  With a network: its name servers (DHCP's, for a
 * bridge, are written in later through resolv_fd). */
static int resolv_fd = -1;

static void write_resolv(int fd, const struct spec *s, const char *const *dns, int ndns)
{
	if (ftruncate(fd, 0) != 0 || lseek(fd, 0, SEEK_SET) != 0)
		return;
	if (!s->net) {
		dprintf(fd, "# sandbox: this sandbox has no network; the resolver below refuses every lookup\n"
			    "nameserver 127.0.0.1\noptions attempts:1 timeout:1\n");
		return;
	}
	const char *mode = strrchr(s->net, ' ');
	dprintf(fd, "# sandbox: --net %s\n", mode ? mode + 1 : s->net);
	if (s->search && *s->search)
		dprintf(fd, "search %s\n", s->search);
	for (int i = 0; i < ndns; i++)
		dprintf(fd, "nameserver %s\n", dns[i]);
}

/* DHCP's name servers, for a spec that named none. */
void resolv_servers(const struct spec *s, const char *const *dns, int ndns)
{
	if (resolv_fd >= 0)
		write_resolv(resolv_fd, s, dns, ndns);
}

/* Where the new root's /etc/resolv.conf leads (a symlink: its target,
 * made if missing, e.g. systemd-resolved's file in our fresh /run). */
static void resolv_target(char *target, size_t sz)
{
	char link[4096];
	struct stat st;
	snprintf(target, sz, NEWROOT "/etc/resolv.conf");
	if (lstat(target, &st) != 0 || !S_ISLNK(st.st_mode))
		return;
	ssize_t n = readlink(target, link, sizeof link - 1);
	if (n <= 0)
		return;
	link[n] = 0;
	if (link[0] == '/') /* absolute: inside the new root, not ours */
		snprintf(target, sz, NEWROOT "%s", link);
	if (stat(target, &st) != 0) {
		char dir[4200];
		snprintf(dir, sizeof dir, "%s", target);
		char *slash = strrchr(dir, '/');
		if (slash) {
			*slash = 0;
			make_dirs(dir, 0755);
		}
		close(open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
	}
}

void private_resolv_conf(const struct spec *s)
{
	int fd = open("/stage/resolv.conf", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return;
	write_resolv(fd, s, (const char *const *)s->dns, s->ndns);
	resolv_fd = fd;
	char target[4200];
	resolv_target(target, sizeof target);
	if (mount("/stage/resolv.conf", target, NULL, MS_BIND, NULL) != 0)
		ctl_send("L no private resolv.conf: %s", strerror(errno));
}

/* ---- the refusing resolver ------------------------------------------------ */

static int dns_fd = -1, dns_told;

void dns_setup(void)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(53), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	dns_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (dns_fd >= 0 && bind(dns_fd, (struct sockaddr *)&a, sizeof a) != 0) {
		close(dns_fd);
		dns_fd = -1;
	}
}

int dns_socket(void)
{
	return dns_fd;
}

/* The question's name, printable, into name (nl bytes, dot-ended labels);
 * returns the offset after the question, or 12 if there is none to echo. */
static size_t question(const unsigned char *q, size_t n, char *name, size_t namesz, size_t *nl)
{
	size_t off = 12;
	*nl = 0;
	while (off < n && q[off] && !(q[off] & 0xc0) && off + 1 + q[off] <= n) {
		for (size_t i = 0; i < q[off] && *nl + 2 < namesz; i++) {
			unsigned char c = q[off + 1 + i];
			name[(*nl)++] = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ? (char)c : '?';
		}
		if (*nl + 1 < namesz)
			name[(*nl)++] = '.';
		off += 1 + q[off];
	}
	if (off < n && q[off] == 0 && off + 5 <= n)
		return off + 5; /* the root label, QTYPE and QCLASS */
	*nl = 0;
	return 12;
}

size_t dns_refusal(unsigned char *q, size_t n, char *name, size_t namesz)
{
	size_t off = 12, nl = 0;
	name[0] = 0;
	if (n < 12)
		return 0;
	if (q[4] == 0 && q[5] == 1) /* one question: echoed */
		off = question(q, n, name, namesz, &nl);
	if (off == 12)
		q[4] = q[5] = 0;
	q[2] = (unsigned char)((q[2] & 0x79) | 0x80); /* a response; opcode and RD kept */
	q[3] = 0x85;                                  /* RA, REFUSED */
	memset(q + 6, 0, 6);
	name[nl > 1 ? nl - 1 : nl] = 0; /* the last dot goes */
	return off;
}

/* Answer REFUSED, and tell the host the first name asked for: a command
 * that fails after a lookup gets a hint that there is no network. */
void dns_answer(void)
{
	unsigned char q[512];
	struct sockaddr_storage from;
	socklen_t fl = sizeof from;
	ssize_t n = recvfrom(dns_fd, q, sizeof q, 0, (struct sockaddr *)&from, &fl);
	if (n < 12)
		return;
	char name[256];
	size_t len = dns_refusal(q, (size_t)n, name, sizeof name);
	sendto(dns_fd, q, len, 0, (struct sockaddr *)&from, fl);
	if (*name && !dns_told) {
		dns_told = 1;
		ctl_send("N %s", name);
	}
}
