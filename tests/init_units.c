/* Host-side unit tests of the guest init's pure parts (tests/test_init_units.py
 * builds this with every guest-init C file but main.c, under ASan and UBSan).
 *
 *   init_units selftest             fixed cases; "passed N" and status 0, or a
 *                                   "FAIL" line per failed check and status 1
 *   init_units spec                 stdin: spec records -> the parsed spec
 *   init_units frames N...          stdin: a frame stream fed in chunks of N
 *                                   bytes (in turn) -> the frames
 *   init_units dhcp XID HWHEX       stdin: a reply -> the lease
 *   init_units dns                  stdin: a query -> the answer and the name
 *
 * The input modes print one line per item, strings in hex, so that the
 * Python side compares them with what it encoded; their buffers are
 * exactly as long as the input, so ASan sees any read past its end.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "init.h"

static int checks, failures;

#define CHECK(cond) check((cond), #cond, __LINE__)
static void check(int ok, const char *what, int line)
{
	checks++;
	if (!ok) {
		failures++;
		printf("FAIL line %d: %s\n", line, what);
	}
}

static int streq(const char *a, const char *b)
{
	return a && b && !strcmp(a, b);
}

static void hex(const void *p, size_t n)
{
	const unsigned char *b = p;
	for (size_t i = 0; i < n; i++)
		printf("%02x", b[i]);
}

static void hexstr(const char *s)
{
	if (s)
		hex(s, strlen(s));
	else
		printf("-");
}

/* All of stdin, in a buffer of exactly its size. */
static char *slurp(size_t *len)
{
	size_t cap = 4096, n = 0;
	char *buf = malloc(cap);
	ssize_t r;
	while (buf && (r = read(0, buf + n, cap - n)) > 0)
		if ((n += (size_t)r) == cap)
			buf = realloc(buf, cap *= 2);
	if (!buf)
		abort();
	char *exact = malloc(n ? n : 1);
	memcpy(exact, buf, n);
	free(buf);
	*len = n;
	return exact;
}

/* ---- the spec ------------------------------------------------------------ */

/* A spec from a C string with '|' for each NUL, parsed; NULL or why not. */
static const char *parse_text(const char *text, struct spec *s, char **buf)
{
	size_t len = strlen(text);
	*buf = malloc(len ? len : 1);
	for (size_t i = 0; i < len; i++)
		(*buf)[i] = text[i] == '|' ? 0 : text[i];
	return spec_parse(*buf, len, s);
}

static void test_spec(void)
{
	struct spec s;
	char *buf;
	const char *why = parse_text("Atrue|Aa b|EX=1|C/w|H/root|U1000|G100|S4|S27|M27|T5|R24|W80|F2|X3|Y1|"
				     "Z3 8388608 -1|m:::64M:/t|mT:u:1777::/u|mW:s1:::/rw|r00ff|t123|"
				     "n02:00:00:00:00:01 dhcp - 2 9000 1500 bridge=br0|d10.0.0.1|d10.0.0.2|sex.org|",
				     &s, &buf);
	CHECK(why == NULL);
	if (why)
		return;
	CHECK(s.argc == 2 && streq(s.argv[0], "true") && streq(s.argv[1], "a b") && !s.argv[2]);
	CHECK(s.envc == 1 && streq(s.envp[0], "X=1") && !s.envp[1]);
	CHECK(streq(s.cwd, "/w") && streq(s.home, "/root"));
	CHECK(s.uid == 1000 && s.gid == 100 && s.ngroups == 2 && s.groups[0] == 4 && s.groups[1] == 27);
	CHECK(s.umask == 027 && s.tty == 5 && s.rows == 24 && s.cols == 80 && s.closed == 2);
	CHECK(s.x11 == 4 && s.xpra == 1);
	CHECK(s.nrlims == 1 && s.rlims[0].resource == 3 && s.rlims[0].lim.rlim_cur == 8388608 && s.rlims[0].lim.rlim_max == RLIM_INFINITY);
	CHECK(s.nmops == 3 && s.mops[0].op == 0 && s.mops[0].mode == 0755 && streq(s.mops[0].size, "64M"));
	CHECK(s.mops[1].op == MOP_TMPFS && streq(s.mops[1].tag, "u") && s.mops[1].mode == 01777 && streq(s.mops[1].path, "/u"));
	CHECK(s.rw_share == 1 && streq(s.mops[2].tag, "s1"));
	CHECK(streq(s.entropy, "00ff") && s.realtime_ns == 123);
	CHECK(streq(s.net, "02:00:00:00:00:01 dhcp - 2 9000 1500 bridge=br0"));
	CHECK(s.ndns == 2 && streq(s.dns[1], "10.0.0.2") && !s.dns[2] && streq(s.search, "ex.org"));
	spec_free(&s);
	free(buf);
	/* A mount record's fields are no records of their own, whatever
	 * letter they start with ('s' is the search list, 'A' an argument). */
	CHECK(parse_text("Atrue|mW:share0:::/x|mT::700:A1:/y|", &s, &buf) == NULL);
	CHECK(s.argc == 1 && !s.argv[1] && !s.search && s.nmops == 2 && streq(s.mops[1].size, "A1") && streq(s.mops[0].tag, "share0"));
	spec_free(&s);
	free(buf);
	/* Defaults: umask 022, no X11. */
	CHECK(parse_text("Ax|", &s, &buf) == NULL && s.umask == 022 && s.x11 == 0 && !s.cwd && s.rw_share == 0);
	spec_free(&s);
	free(buf);
}

static void test_spec_errors(void)
{
	static const struct {
		const char *text, *why;
	} bad[] = {
		{"", "empty command"},
		{"Ex=1|", "empty command"},
		{"Atrue", "bad spec: a record is not terminated"},
		{"Atrue|U", "bad spec: a record is not terminated"},
		{"Atrue|U-1|", "bad number in the spec"},
		{"Atrue|U4294967295|", "bad number in the spec"}, /* (uid_t)-1: no change of user */
		{"Atrue|U12x|", "bad number in the spec"},
		{"Atrue|U|", "bad number in the spec"},
		{"Atrue|G 5|", "bad number in the spec"},
		{"Atrue|M8|", "bad number in the spec"},
		{"Atrue|M1000|", "bad number in the spec"},
		{"Atrue|T16|", "bad number in the spec"},
		{"Atrue|R65536|", "bad number in the spec"},
		{"Atrue|S99999999999999999999|", "bad number in the spec"},
		{"Atrue|Z3 1|", "bad rlimit record"},
		{"Atrue|Z99 1 1|", "bad rlimit record"},
		{"Atrue|mO:::/x|", "bad mount record"},
		{"Atrue|mO::9::/x|", "bad mount record"},
		{"Atrue|mO::::x|", "mount path is not absolute"},
		{"Atrue|mO::::|", "mount path is not absolute"},
	};
	for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
		struct spec s;
		char *buf;
		const char *why = parse_text(bad[i].text, &s, &buf);
		CHECK(streq(why, bad[i].why));
		if (!streq(why, bad[i].why))
			printf("  spec \"%s\": %s\n", bad[i].text, why ? why : "(parsed)");
		CHECK(!s.argv && !s.mops); /* freed */
		free(buf);
	}
}

/* ---- mount paths ------------------------------------------------------------ */

static void test_mounts(void)
{
	char out[64], rec[] = "O::::/home/a:b, c", tmp[] = "T:u:1777:64M:/scratch";
	struct mop m;
	CHECK(parse_mop(rec, &m) == NULL && m.op == 'O' && streq(m.path, "/home/a:b, c") && m.mode == 0755 && streq(m.size, ""));
	CHECK(root_path(out, sizeof out, "/etc/resolv.conf") == 0 && streq(out, NEWROOT "/etc/resolv.conf"));
	CHECK(root_path(out, 12, "/etc/resolv.conf") == -1);
	CHECK(root_path(out, sizeof NEWROOT "/e", "/e") == 0 && streq(out, NEWROOT "/e"));
	CHECK(root_path(out, sizeof NEWROOT "/e" - 1, "/e") == -1);
	char img[] = "I:/root/.cache/sandbox/files/k-d.erofs:::/usr/include";
	CHECK(parse_mop(img, &m) == NULL && m.op == MOP_IMAGE && streq(m.tag, "/root/.cache/sandbox/files/k-d.erofs") && streq(m.path, "/usr/include"));
	CHECK(blob_path(out, sizeof out, "/c/k-d.erofs") == 0 && streq(out, "/c/k-d.blob"));
	CHECK(blob_path(out, sizeof "/c/k-d.blob", "/c/k-d.erofs") == 0);
	CHECK(blob_path(out, sizeof "/c/k-d.blob" - 1, "/c/k-d.erofs") == -1);
	CHECK(blob_path(out, sizeof out, "/c/k-d.img") == -1 && blob_path(out, sizeof out, ".erof") == -1);
	CHECK(parse_mop(tmp, &m) == NULL);
	tmpfs_opts(out, sizeof out, &m, 1000, 100);
	CHECK(streq(out, "mode=1777,uid=1000,gid=100,size=64M"));
	m.tag = "", m.size = "", m.mode = 0700;
	tmpfs_opts(out, sizeof out, &m, 1000, 100);
	CHECK(streq(out, "mode=700"));
	char longpath[PATH_MAX + 16] = "O::::/";
	memset(longpath + 6, 'a', PATH_MAX);
	longpath[PATH_MAX + 6] = 0;
	CHECK(streq(parse_mop(longpath, &m), "bad mount record"));
}

/* ---- frames ------------------------------------------------------------------ */

struct seen {
	int n;
	char type[8];
	uint32_t id[8], len[8];
	char data[8][16];
};

static void collect(void *arg, char type, uint32_t id, char *data, uint32_t len)
{
	struct seen *s = arg;
	if (s->n < 8) {
		s->type[s->n] = type, s->id[s->n] = id, s->len[s->n] = len;
		memcpy(s->data[s->n], data, len < 16 ? len : 16);
	}
	s->n++;
}

static void test_frames(void)
{
	char hdr[MUX_HDR];
	mux_header(hdr, 'D', 0x04030201, 0x0a);
	CHECK(!memcmp(hdr, "D\x01\x02\x03\x04\x0a\0\0\0", MUX_HDR));
	/* Two frames through a pipe, read back in every split. */
	int p[2];
	CHECK(pipe(p) == 0);
	mux_send(p[1], 'S', 7, "A1\0", 3);
	mux_send(p[1], 'i', 0xffffffffu, NULL, 0);
	char stream[64];
	ssize_t n = read(p[0], stream, sizeof stream);
	CHECK(n == 2 * MUX_HDR + 3);
	struct mux_in *in = calloc(1, sizeof *in);
	for (ssize_t cut = 0; cut <= n; cut++) {
		struct seen s = {0};
		in->len = 0;
		memcpy(in->buf, stream, (size_t)cut);
		in->len = (size_t)cut;
		CHECK(mux_dispatch(in, collect, &s) == 0);
		memcpy(in->buf + in->len, stream + cut, (size_t)(n - cut));
		in->len += (size_t)(n - cut);
		CHECK(mux_dispatch(in, collect, &s) == 0);
		CHECK(s.n == 2 && s.type[0] == 'S' && s.id[0] == 7 && s.len[0] == 3 && !memcmp(s.data[0], "A1", 3));
		CHECK(s.type[1] == 'i' && s.id[1] == 0xffffffffu && s.len[1] == 0 && in->len == 0);
	}
	/* mux_read takes what the fd has. */
	mux_send(p[1], 'K', 9, "15", 2);
	in->len = 0;
	CHECK(mux_read(in, p[0]) == MUX_HDR + 2 && in->len == MUX_HDR + 2);
	/* A frame longer than MUX_MAX_PAYLOAD: those before it are handed on, then -1. */
	struct seen s = {0};
	in->len = 0;
	mux_header(in->buf, 'D', 1, 1);
	in->buf[MUX_HDR] = 'x';
	mux_header(in->buf + MUX_HDR + 1, 'D', 2, MUX_MAX_PAYLOAD + 1);
	in->len = 2 * MUX_HDR + 1;
	CHECK(mux_dispatch(in, collect, &s) == -1 && s.n == 1 && s.id[0] == 1);
	/* The largest frame fills the buffer exactly. */
	s.n = 0;
	mux_header(in->buf, 'D', 3, MUX_MAX_PAYLOAD);
	in->len = sizeof in->buf;
	CHECK(mux_dispatch(in, collect, &s) == 0 && s.n == 1 && s.len[0] == MUX_MAX_PAYLOAD && in->len == 0);
	free(in);
	close(p[0]);
	close(p[1]);
}

static void test_outq(void)
{
	struct outq q = {0};
	int p[2];
	char got[16];
	CHECK(pipe(p) == 0);
	CHECK(outq_push(&q, "abc", 3) == 0 && outq_push(&q, "", 0) == 0 && outq_push(&q, "de", 2) == 0);
	CHECK(outq_pending(&q) == 5);
	CHECK(outq_flush(&q, p[1]) == 0 && outq_pending(&q) == 0);
	CHECK(read(p[0], got, sizeof got) == 5 && !memcmp(got, "abcde", 5));
	CHECK(outq_push(&q, "f", 1) == 0);
	close(p[0]);
	CHECK(outq_flush(&q, p[1]) == -1 && outq_pending(&q) == 1); /* EPIPE: the reader is gone */
	outq_free(&q);
	CHECK(outq_pending(&q) == 0 && !q.buf);
	close(p[1]);
}

/* ---- DHCP ----------------------------------------------------------------- */

static const unsigned char hw[6] = {2, 0, 0, 0, 0, 9};

/* The option `code` of a message built by dhcp_request, or NULL. */
static const uint8_t *option(const struct dhcp_msg *m, size_t len, uint8_t code)
{
	const uint8_t *o = m->options, *end = (const uint8_t *)m + len;
	while (o < end && *o != 255) {
		if (*o == code)
			return o;
		o += 2 + o[1];
	}
	return NULL;
}

static void test_dhcp_request(void)
{
	struct dhcp_msg m;
	size_t len = dhcp_request(&m, hw, 0x11223344, DHCP_DISCOVER, NULL);
	const uint8_t *t = option(&m, len, 53), *params = option(&m, len, 55);
	CHECK(m.op == 1 && m.htype == 1 && m.hlen == 6 && m.xid == 0x11223344 && m.flags == htons(0x8000));
	CHECK(!memcmp(m.chaddr, hw, 6) && !memcmp(m.magic, "\x63\x82\x53\x63", 4));
	CHECK(t && t[1] == 1 && t[2] == DHCP_DISCOVER && params && params[1] == 3 && !memcmp(params + 2, "\x01\x03\x06", 3));
	CHECK(!option(&m, len, 50) && ((const uint8_t *)&m)[len - 1] == 255);
	struct dhcp_lease offer = {.addr = inet_addr("10.0.0.7"), .server = inet_addr("10.0.0.1")};
	len = dhcp_request(&m, hw, 5, DHCP_REQUEST, &offer);
	const uint8_t *want = option(&m, len, 50), *server = option(&m, len, 54);
	t = option(&m, len, 53);
	CHECK(t && t[2] == DHCP_REQUEST);
	CHECK(want && want[1] == 4 && !memcmp(want + 2, &offer.addr, 4) && server && !memcmp(server + 2, &offer.server, 4));
}

/* An ACK, as a server sends it. */
static size_t reply(struct dhcp_msg *m, uint32_t xid)
{
	static const uint8_t opts[] = {53, 1, 5, 0, 54, 4, 10, 0, 0, 1, 1, 4, 255, 255, 0, 0, 3, 8, 10, 0, 0, 1, 10, 0, 0, 2,
				       6, 16, 1, 1, 1, 1, 8, 8, 8, 8, 9, 9, 9, 9, 4, 4, 4, 4, 255};
	memset(m, 0, sizeof *m);
	m->op = 2, m->xid = xid, m->yiaddr = inet_addr("10.0.3.4");
	memcpy(m->chaddr, hw, 6);
	memcpy(m->options, opts, sizeof opts);
	return offsetof(struct dhcp_msg, options) + sizeof opts;
}

static void test_dhcp_parse(void)
{
	struct dhcp_msg m;
	struct dhcp_lease l;
	size_t len = reply(&m, 77);
	CHECK(dhcp_parse(&m, len, hw, 77, &l) == DHCP_ACK);
	CHECK(l.addr == inet_addr("10.0.3.4") && l.server == inet_addr("10.0.0.1") && l.mask == inet_addr("255.255.0.0"));
	CHECK(l.router == inet_addr("10.0.0.1") && l.ndns == 3 && streq(l.dns[0], "1.1.1.1") && streq(l.dns[2], "9.9.9.9"));
	CHECK(dhcp_parse(&m, len, hw, 78, &l) == 0);                                  /* another exchange's */
	CHECK(dhcp_parse(&m, len, (const unsigned char *)"\2\0\0\0\0\x08", 77, &l) == 0); /* another client's */
	CHECK(dhcp_parse(&m, offsetof(struct dhcp_msg, options) - 1, hw, 77, &l) == 0);
	CHECK(dhcp_parse(&m, sizeof m + 1, hw, 77, &l) == 0);
	CHECK(dhcp_parse(&m, offsetof(struct dhcp_msg, options) + 2, hw, 77, &l) == 0); /* type cut off */
	CHECK(dhcp_parse(&m, offsetof(struct dhcp_msg, options) + 3, hw, 77, &l) == DHCP_ACK && l.server == 0);
	m.op = 1;
	CHECK(dhcp_parse(&m, len, hw, 77, &l) == 0); /* a request, not a reply */
	CHECK(mask_plen(inet_addr("255.255.255.0")) == 24 && mask_plen(0) == 24 && mask_plen(inet_addr("255.255.0.0")) == 16);
	CHECK(mask_plen(inet_addr("255.255.255.255")) == 32 && mask_plen(inet_addr("128.0.0.0")) == 1);
}

/* ---- the refusing resolver, modules, the network record ------------------------ */

static void test_dns(void)
{
	unsigned char q[64] = {0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, 'w', 'w', 'w', 7, 'e', 'x', 'a', 'm', 'p', 'l', 'e', 3, 'c',
			       'o', 'm', 0, 0, 1, 0, 1, 0xaa};
	char name[256];
	size_t len = dns_refusal(q, 34, name, sizeof name);
	CHECK(len == 33 && streq(name, "www.example.com"));
	CHECK(q[0] == 0x12 && q[1] == 0x34 && q[2] == 0x81 && q[3] == 0x85 && q[5] == 1 && q[7] == 0 && q[11] == 0);
	unsigned char odd[] = {0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, 'a', '.', 0xff, 0, 0, 1, 0, 1};
	CHECK(dns_refusal(odd, sizeof odd, name, sizeof name) == sizeof odd && streq(name, "a??"));
	unsigned char cut[] = {0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, 'a', 'b', 'c', 0, 0, 1}; /* no QCLASS */
	CHECK(dns_refusal(cut, sizeof cut, name, sizeof name) == 12 && streq(name, "") && cut[5] == 0);
	CHECK(dns_refusal(cut, 11, name, sizeof name) == 0);
	/* A name longer than the buffer: cut, never past it. */
	unsigned char big[512] = {0, 0, 0, 0, 0, 1};
	size_t off = 12;
	while (off + 2 + 5 < sizeof big)
		big[off++] = 1, big[off++] = 'x';
	big[off] = 0;
	CHECK(dns_refusal(big, off + 5, name, sizeof name) == off + 5 && strlen(name) == 254);
}

static void test_small_parsers(void)
{
	char out[64];
	module_params("quiet virtio_mmio.device=4K@0xfeb00e00:12 virtio_mmio.x=1\nvirtio_mmiox.y=2 virtio_mmio.", "virtio_mmio", out, sizeof out);
	CHECK(streq(out, "device=4K@0xfeb00e00:12 x=1 "));
	module_params("a.b=1", "a", out, 4);
	CHECK(streq(out, "")); /* no room: left out, not cut */
	struct netcfg n;
	CHECK(net_parse("02:00:00:00:00:0a 10.0.2.15/24 10.0.2.2 1 10000 0 user", &n) == 0);
	CHECK(n.hw[5] == 10 && streq(n.ipv4, "10.0.2.15/24") && streq(n.gw4, "10.0.2.2") && n.ipv6 == 1 && n.wait_ms == 10000 && streq(n.mode, "user"));
	CHECK(net_parse("02:00:00:00:00 dhcp - 0 1 0 user", &n) == -1);
	CHECK(net_parse("02:00:00:00:00:01 dhcp - 0 1", &n) == -1);
}

static int selftest(void)
{
	signal(SIGPIPE, SIG_IGN);
	test_spec();
	test_spec_errors();
	test_mounts();
	test_frames();
	test_outq();
	test_dhcp_request();
	test_dhcp_parse();
	test_dns();
	test_small_parsers();
	printf("%s %d checks, %d failed\n", failures ? "FAILED" : "passed", checks, failures);
	return failures ? 1 : 0;
}

/* ---- input modes ------------------------------------------------------------ */

static int spec_mode(void)
{
	size_t len;
	char *buf = slurp(&len);
	struct spec s;
	const char *why = spec_parse(buf, len, &s);
	if (why) {
		printf("error %s\n", why);
		free(buf);
		return 0;
	}
	for (int i = 0; i < s.argc; i++)
		printf("A "), hexstr(s.argv[i]), printf("\n");
	for (int i = 0; i < s.envc; i++)
		printf("E "), hexstr(s.envp[i]), printf("\n");
	printf("C "), hexstr(s.cwd), printf("\nH "), hexstr(s.home), printf("\n");
	printf("ids %u %u %o\n", s.uid, s.gid, s.umask);
	for (int i = 0; i < s.ngroups; i++)
		printf("S %u\n", s.groups[i]);
	printf("tty %d %d %d %d\nx11 %d %d\nrw %d\nt %lld\n", s.tty, s.rows, s.cols, s.closed, s.x11, s.xpra, s.rw_share, s.realtime_ns);
	for (int i = 0; i < s.nrlims; i++)
		printf("Z %d %lld %lld\n", s.rlims[i].resource, (long long)s.rlims[i].lim.rlim_cur, (long long)s.rlims[i].lim.rlim_max);
	for (int i = 0; i < s.nmops; i++) {
		const struct mop *m = &s.mops[i];
		printf("m %02x ", (unsigned char)m->op), hexstr(m->tag), printf(" %o ", m->mode), hexstr(m->size), printf(" "), hexstr(m->path),
			printf("\n");
	}
	printf("r "), hexstr(s.entropy), printf("\nn "), hexstr(s.net), printf("\n");
	for (int i = 0; i < s.ndns; i++)
		printf("d "), hexstr(s.dns[i]), printf("\n");
	printf("s "), hexstr(s.search), printf("\n");
	printf("N "), hexstr(s.hostname), printf("\n");
	spec_free(&s);
	free(buf);
	return 0;
}

static void print_frame(void *arg, char type, uint32_t id, char *data, uint32_t len)
{
	(void)arg;
	printf("frame %02x %u %u ", (unsigned char)type, id, len);
	hex(data, len);
	printf("\n");
}

static int frames_mode(int nchunks, char **chunks)
{
	size_t len, off = 0;
	char *stream = slurp(&len);
	struct mux_in *in = malloc(sizeof *in);
	in->len = 0;
	for (int i = 0; off < len; i = (i + 1) % nchunks) {
		size_t n = strtoul(chunks[i], NULL, 10), room = sizeof in->buf - in->len;
		n = n < 1 ? 1 : n > len - off ? len - off : n;
		n = n > room ? room : n;
		if (!n) { /* a full buffer that holds no whole frame: the codec is wrong */
			printf("stuck\n");
			break;
		}
		memcpy(in->buf + in->len, stream + off, n);
		in->len += n, off += n;
		if (mux_dispatch(in, print_frame, NULL) != 0) {
			printf("error\n");
			break;
		}
	}
	printf("rest %zu\n", in->len);
	free(in);
	free(stream);
	return 0;
}

static int dhcp_mode(const char *xid, const char *hwhex)
{
	size_t len;
	char *msg = slurp(&len);
	unsigned char addr[6];
	for (int i = 0; i < 6; i++)
		sscanf(hwhex + 2 * i, "%2hhx", &addr[i]);
	struct dhcp_lease l;
	/* As recv gives it: at most a whole message, in a buffer of its size. */
	int type = dhcp_parse((const struct dhcp_msg *)msg, len, addr, (uint32_t)strtoul(xid, NULL, 10), &l);
	printf("type %d\n", type);
	if (type) {
		printf("lease %08x %08x %08x %08x", ntohl(l.addr), ntohl(l.server), ntohl(l.mask), ntohl(l.router));
		for (int i = 0; i < l.ndns; i++)
			printf(" %s", l.dns[i]);
		printf("\n");
	}
	free(msg);
	return 0;
}

static int dns_mode(void)
{
	size_t len;
	unsigned char *q = (unsigned char *)slurp(&len);
	char name[256];
	size_t n = dns_refusal(q, len, name, sizeof name);
	printf("answer ");
	hex(q, n);
	printf("\nname ");
	hexstr(name);
	printf("\n");
	free(q);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 2 && !strcmp(argv[1], "selftest"))
		return selftest();
	if (argc == 2 && !strcmp(argv[1], "spec"))
		return spec_mode();
	if (argc >= 3 && !strcmp(argv[1], "frames"))
		return frames_mode(argc - 2, argv + 2);
	if (argc == 4 && !strcmp(argv[1], "dhcp"))
		return dhcp_mode(argv[2], argv[3]);
	if (argc == 2 && !strcmp(argv[1], "dns"))
		return dns_mode();
	fprintf(stderr, "usage: init_units selftest|spec|frames N...|dhcp XID HWHEX|dns\n");
	return 2;
}
