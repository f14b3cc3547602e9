/* The network: loopback in every sandbox; with --net, eth0 brought up early
 * (its MAC, MTU, IPv6 settings, a static IPv4 address and route), and the
 * command held back until its addresses are usable (DHCP, SLAAC). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "init.h"

/* Loopback is up in every sandbox: local servers and their clients work. */
void loopback_up(void)
{
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	strcpy(ifr.ifr_name, "lo");
	if (fd < 0 || ioctl(fd, SIOCGIFFLAGS, &ifr) != 0)
		die("loopback: %s", strerror(errno));
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	if (ioctl(fd, SIOCSIFFLAGS, &ifr) != 0)
		die("loopback up: %s", strerror(errno));
	close(fd);
}

/* ---- --net: the interface ---------------------------------------------- */

int net_parse(const char *rec, struct netcfg *n)
{
	char ipv6[8];
	memset(n, 0, sizeof *n);
	if (sscanf(rec, "%31s %63s %63s %7s %d %d %63s", n->mac, n->ipv4, n->gw4, ipv6, &n->wait_ms, &n->mtu, n->mode) != 7 ||
	    sscanf(n->mac, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &n->hw[0], &n->hw[1], &n->hw[2], &n->hw[3], &n->hw[4], &n->hw[5]) != 6)
		return -1;
	n->ipv6 = atoi(ipv6);
	return 0;
}

static void write_file(const char *path, const char *value)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0 || write(fd, value, strlen(value)) < 0)
		ctl_send("L cannot set %s: %s", path, strerror(errno));
	if (fd >= 0)
		close(fd);
}

static void ipv6_conf(const char *ifname, const char *key, const char *value)
{
	char path[128];
	snprintf(path, sizeof path, "/proc/sys/net/ipv6/conf/%s/%s", ifname, key);
	write_file(path, value);
}

/* SLAAC without duplicate-address detection (the host hands out unique
 * MACs), and a router solicitation at once, not after the standard's
 * random delay of up to a second. */
static void ipv6_settings(int ipv6)
{
	ipv6_conf("all", "accept_dad", "0"); /* the kernel does DAD if either says so */
	ipv6_conf(NET_IF, "accept_dad", "0");
	ipv6_conf(NET_IF, "dad_transmits", "0");
	ipv6_conf(NET_IF, "router_solicitation_delay", "0");
	ipv6_conf(NET_IF, "accept_ra", ipv6 ? "1" : "0");
	if (!ipv6)
		ipv6_conf(NET_IF, "disable_ipv6", "1");
	ipv6_conf(NET_IF, "autoconf", ipv6 ? "1" : "0");
}

static int if_ioctl(int fd, unsigned long req, struct ifreq *ifr)
{
	strcpy(ifr->ifr_name, NET_IF);
	return ioctl(fd, req, ifr);
}

static void set_in_addr(struct sockaddr *sa, in_addr_t a)
{
	struct sockaddr_in *in = (struct sockaddr_in *)sa;
	memset(in, 0, sizeof *in);
	in->sin_family = AF_INET;
	in->sin_addr.s_addr = a;
}

void ipv4_configure(int fd, const struct netcfg *n, in_addr_t addr, int plen, in_addr_t gw)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	set_in_addr(&ifr.ifr_addr, addr);
	if (if_ioctl(fd, SIOCSIFADDR, &ifr) != 0)
		die("--net %s: cannot set the address: %s", n->mode, strerror(errno));
	set_in_addr(&ifr.ifr_netmask, plen ? htonl(~0u << (32 - plen)) : 0);
	if (if_ioctl(fd, SIOCSIFNETMASK, &ifr) != 0)
		die("--net %s: cannot set the netmask: %s", n->mode, strerror(errno));
	if (!gw)
		return;
	struct rtentry rt;
	memset(&rt, 0, sizeof rt);
	set_in_addr(&rt.rt_dst, 0);
	set_in_addr(&rt.rt_genmask, 0);
	set_in_addr(&rt.rt_gateway, gw);
	rt.rt_flags = RTF_UP | RTF_GATEWAY;
	rt.rt_dev = (char *)NET_IF;
	if (ioctl(fd, SIOCADDRT, &rt) != 0 && errno != EEXIST)
		die("--net %s: cannot add the default route: %s", n->mode, strerror(errno));
}

/* The MAC is this sandbox's: a restored guest's device still has the
 * template's.  Then its MTU, and up. */
static void link_up(int fd, const struct netcfg *n)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
	memcpy(ifr.ifr_hwaddr.sa_data, n->hw, 6);
	if (fd < 0 || if_ioctl(fd, SIOCSIFHWADDR, &ifr) != 0)
		die("--net %s: cannot set the MAC address %s: %s", n->mode, n->mac, strerror(errno));
	if (n->mtu) {
		ifr.ifr_mtu = n->mtu;
		if (if_ioctl(fd, SIOCSIFMTU, &ifr) != 0)
			ctl_send("L --net %s: cannot set the MTU to %d: %s", n->mode, n->mtu, strerror(errno));
	}
	if (if_ioctl(fd, SIOCGIFFLAGS, &ifr) != 0)
		die("--net %s: %s: %s", n->mode, NET_IF, strerror(errno));
	ifr.ifr_flags |= IFF_UP;
	if (if_ioctl(fd, SIOCSIFFLAGS, &ifr) != 0)
		die("--net %s: cannot bring %s up: %s", n->mode, NET_IF, strerror(errno));
}

/* Bring the interface up as early as possible (before the root is
 * mounted), so that the router's advertisement arrives meanwhile. */
void net_start(const struct spec *s, struct netcfg *n)
{
	if (!s->net)
		return;
	if (net_parse(s->net, n) != 0)
		die("bad network spec '%s'", s->net);
	/* The driver registers the interface as it probes the device, during
	 * its module's load; a moment's grace all the same. */
	for (int i = 0; !if_nametoindex(NET_IF); i++) {
		if (i == 500)
			die("--net %s: the guest has no network interface %s", n->mode, NET_IF);
		usleep(2000);
	}
	ipv6_settings(n->ipv6);
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	link_up(fd, n);
	char *slash = strchr(n->ipv4, '/');
	if (slash) {
		*slash = 0;
		in_addr_t a = inet_addr(n->ipv4), gw = strcmp(n->gw4, "-") ? inet_addr(n->gw4) : 0;
		ipv4_configure(fd, n, a, atoi(slash + 1), gw);
	}
	close(fd);
}

/* ---- waiting for usable addresses ------------------------------------------ */

/* A global, non-tentative IPv6 address on the interface (/proc/net/if_inet6). */
static int global_address(const char *l)
{
	char addr[40], ifname[32];
	unsigned idx, plen, scope, flags;
	return sscanf(l, "%39s %x %x %x %x %31s", addr, &idx, &plen, &scope, &flags, ifname) == 6 &&
	       !strcmp(ifname, NET_IF) && scope == 0 && !(flags & 0x40 /* IFA_F_TENTATIVE */);
}

/* An IPv6 default route through the interface (/proc/net/ipv6_route). */
static int default_route(const char *l)
{
	return !strncmp(l, "00000000000000000000000000000000 00 ", 36) && strstr(l, " " NET_IF);
}

/* 1 if a line of the /proc file `path` is a `match`. */
static int proc_has(const char *path, int (*match)(const char *line))
{
	static char buf[16384];
	if (read_file(path, buf, sizeof buf) < 0)
		return 0;
	char *save = NULL;
	for (char *l = strtok_r(buf, "\n", &save); l; l = strtok_r(NULL, "\n", &save))
		if (match(l))
			return 1;
	return 0;
}

static int ipv6_ready(void)
{
	return proc_has("/proc/net/if_inet6", global_address) && proc_has("/proc/net/ipv6_route", default_route);
}

/* IPv4 from the LAN's DHCP server; 1 if it answered.  Without an answer,
 * IPv6 alone will do if the LAN gave an address already. */
static int net_dhcp(const struct spec *s, const struct netcfg *n, uint64_t deadline)
{
	struct dhcp_lease l;
	if (!dhcp(n, deadline, &l)) {
		if (!(n->ipv6 && ipv6_ready()))
			die("--net %s: no DHCP answer within %.1f s (is there a DHCP server on the bridge?)", n->mode, n->wait_ms / 1000.0);
		ctl_send("L --net %s: no DHCP answer: IPv6 only", n->mode);
		return 0;
	}
	int plen = mask_plen(l.mask);
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	ipv4_configure(fd, n, l.addr, plen, l.router);
	close(fd);
	if (!s->ndns && l.ndns) {
		const char *d[3] = {l.dns[0], l.dns[1], l.dns[2]};
		resolv_servers(s, d, l.ndns);
	}
	struct in_addr a = {l.addr};
	ctl_send("L --net %s: DHCP gave %s/%d", n->mode, inet_ntoa(a), plen);
	return 1;
}

/* The router's advertisement, until the deadline. */
static void net_wait_ipv6(const struct netcfg *n, uint64_t deadline)
{
	while (!ipv6_ready()) {
		if (now_ns() >= deadline) {
			if (n->ipv6 == 2) {
				ctl_send("L --net %s: no IPv6 router advertisement: IPv4 only", n->mode);
				return;
			}
			die("--net %s: no IPv6 address from a router advertisement within %.1f s", n->mode, n->wait_ms / 1000.0);
		}
		usleep(2000);
	}
}

/* The command starts only once its addresses are usable. */
void net_wait(const struct spec *s, struct netcfg *n)
{
	if (!s->net)
		return;
	uint64_t deadline = now_ns() + (uint64_t)n->wait_ms * 1000000ull;
	int have4 = !strcmp(n->ipv4, "dhcp") && net_dhcp(s, n, deadline);
	if (n->ipv6 == 2 && have4) {
		/* Optional IPv6: the RA has been on its way since the link came up. */
		uint64_t grace = now_ns() + 1000000000ull;
		if (grace < deadline)
			deadline = grace;
	}
	if (n->ipv6)
		net_wait_ipv6(n, deadline);
	stamp("net_ready");
}
