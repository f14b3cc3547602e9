/* The command's spec: read from the control port (read_spec), parsed by a
 * pure function over the bytes (spec_parse), which the host tests run. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "init.h"

static void read_exact(int fd, char *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			die("control channel closed while reading the spec");
		got += (size_t)r;
	}
}

/* The header line, one byte at a time: what follows it is not ours to take. */
static void read_header(char *hdr, size_t sz)
{
	size_t i = 0;
	while (i < sz - 1) {
		read_exact(ctl_fd, hdr + i, 1);
		if (hdr[i++] == '\n')
			break;
	}
	hdr[i] = 0;
}

/* "SPEC <len>\n" and the records.  Before it, "ZERO\n" asks for the free
 * memory to be cleared for a template, which is then taken at "ready";
 * "PREP\n" readies a pooled guest for a run to come ("prepped"), and
 * "IMGS <len>\n" and NUL-terminated paths have it mount those images ahead. */
void read_spec(struct spec *s)
{
	char hdr[32];
	size_t len;
	for (;;) {
		read_header(hdr, sizeof hdr);
		if (strcmp(hdr, "ZERO\n") == 0) {
			template_prepare();
			stamp("ready");
		} else if (strcmp(hdr, "PREP\n") == 0) {
			pool_prepare();
			stamp("prepped");
		} else if (sscanf(hdr, "IMGS %zu", &len) == 1 && len <= 65536) {
			/* Images a pooled guest mounts ahead (images.c), NUL-terminated paths. */
			char *paths = malloc(len + 1);
			if (!paths)
				die("out of memory");
			read_exact(ctl_fd, paths, len);
			paths[len] = 0;
			mount_host_root();
			for (char *p = paths; p < paths + len; p += strlen(p) + 1)
				premount_image(p);
			free(paths);
		} else {
			break;
		}
	}
	if (sscanf(hdr, "SPEC %zu", &len) != 1 || len == SIZE_MAX)
		die("bad spec header");
	char *buf = malloc(len + 1);
	if (!buf)
		die("out of memory");
	read_exact(ctl_fd, buf, len);
	buf[len] = 0;
	const char *why = spec_parse(buf, len, s);
	if (why)
		die("%s", why);
}

/* ---- parsing (pure) ------------------------------------------------------ */

/* A whole unsigned number in `base`, at most `max`; 0, or -1 if v is not one. */
static int number(const char *v, int base, unsigned long long max, unsigned long long *out)
{
	if (*v < '0' || *v > '9')
		return -1; /* no sign, no space: strtoull would take those */
	char *end;
	errno = 0;
	*out = strtoull(v, &end, base);
	return *end || errno || *out > max ? -1 : 0;
}

/* "<resource> <soft> <hard>", -1 for unlimited. */
static const char *parse_rlimit(const char *v, struct rlim *r)
{
	long long soft, hard;
	if (sscanf(v, "%d %lld %lld", &r->resource, &soft, &hard) != 3 || r->resource < 0 || r->resource >= RLIMIT_NLIMITS)
		return "bad rlimit record";
	r->lim.rlim_cur = soft < 0 ? RLIM_INFINITY : (rlim_t)soft;
	r->lim.rlim_max = hard < 0 ? RLIM_INFINITY : (rlim_t)hard;
	return NULL;
}

/* "<op>:<tag>:<octal mode>:<size>:<path>"; the path may hold any byte but NUL. */
const char *parse_mop(char *v, struct mop *m)
{
	char *f[4];
	for (int i = 0; i < 4; i++) {
		f[i] = v;
		v = strchr(v, ':');
		if (!v)
			return "bad mount record";
		*v++ = 0;
	}
	unsigned long long mode = 0755;
	if (*f[2] && number(f[2], 8, 07777, &mode) != 0)
		return "bad mount record";
	m->op = f[0][0];
	m->tag = f[1];
	m->mode = (mode_t)mode;
	m->size = f[3];
	m->path = v;
	if (m->path[0] != '/')
		return "mount path is not absolute";
	if (strlen(m->path) >= PATH_MAX)
		return "bad mount record"; /* no mount takes it, and NEWROOT joins it */
	return NULL;
}

/* The largest value of a numeric record's key; 0: its value is no number. */
static unsigned long long number_max(char key)
{
	switch (key) {
	case 'U': case 'G': case 'S': return UINT32_MAX - 1; /* (uid_t)-1 would change nothing */
	case 'M': return 0777;
	case 'T': return TTY_STDIN | TTY_STDOUT | TTY_STDERR | TTY_STDIN_FILE;
	case 'F': return 7;
	case 'R': case 'W': return 65535; /* a field of struct winsize */
	case 'X': return INT_MAX - 1;
	case 't': return LLONG_MAX;
	default: return 0;
	}
}

/* One record into *s, whose arrays were sized by counting the keys. */
static const char *record(struct spec *s, char *p)
{
	char key = *p, *v = p + 1;
	unsigned long long n = 0, max = number_max(key);
	if (max && number(v, key == 'M' ? 8 : 10, max, &n) != 0)
		return "bad number in the spec";
	switch (key) {
	case 'A': s->argv[s->argc++] = v; break;
	case 'E': s->envp[s->envc++] = v; break;
	case 'C': s->cwd = v; break;
	case 'H': s->home = v; break;
	case 'U': s->uid = (uid_t)n; break;
	case 'G': s->gid = (gid_t)n; break;
	case 'S': s->groups[s->ngroups++] = (gid_t)n; break;
	case 'M': s->umask = (mode_t)n; break;
	case 'T': s->tty = (int)n; break;
	case 'F': s->closed = (int)n; break;
	case 'R': s->rows = (int)n; break;
	case 'W': s->cols = (int)n; break;
	case 'X': s->x11 = (int)n + 1; break; /* 0: no X11 */
	case 'Y': s->xpra = 1; break;
	case 'Z': return parse_rlimit(v, &s->rlims[s->nrlims++]);
	case 'r': s->entropy = v; break;
	case 't': s->realtime_ns = (long long)n; break;
	case 'n': s->net = v; break;
	case 'd': s->dns[s->ndns++] = v; break;
	case 's': s->search = v; break;
	case 'N': s->hostname = v; break;
	case 'm': {
		struct mop *m = &s->mops[s->nmops++];
		const char *why = parse_mop(v, m);
		s->rw_share |= m->op == MOP_SHARE_RW;
		return why;
	}
	default: break; /* no such key: the host and the init ship together, so never */
	}
	return NULL;
}

void spec_free(struct spec *s)
{
	free(s->argv);
	free(s->envp);
	free(s->groups);
	free(s->rlims);
	free(s->mops);
	free(s->dns);
	s->argv = s->envp = NULL;
	s->groups = NULL;
	s->rlims = NULL;
	s->mops = NULL;
	s->dns = NULL;
}

/* The arrays, one slot a record of their key (argv, envp and dns end in NULL). */
static int spec_alloc(struct spec *s, const size_t counts[256])
{
	s->argv = calloc(counts['A'] + 1, sizeof *s->argv);
	s->envp = calloc(counts['E'] + 1, sizeof *s->envp);
	s->groups = calloc(counts['S'] + 1, sizeof *s->groups);
	s->rlims = calloc(counts['Z'] + 1, sizeof *s->rlims);
	s->mops = calloc(counts['m'] + 1, sizeof *s->mops);
	s->dns = calloc(counts['d'] + 1, sizeof *s->dns);
	return s->argv && s->envp && s->groups && s->rlims && s->mops && s->dns ? 0 : -1;
}

const char *spec_parse(char *buf, size_t len, struct spec *s)
{
	memset(s, 0, sizeof *s);
	s->umask = 022;
	/* Every record ends in a NUL, the last one too: then strlen stays inside. */
	if (len && buf[len - 1] != 0)
		return "bad spec: a record is not terminated";
	size_t counts[256] = {0};
	for (char *p = buf; p < buf + len; p += strlen(p) + 1)
		counts[(unsigned char)*p]++;
	const char *why = spec_alloc(s, counts) ? "out of memory reading the spec" : NULL;
	for (char *p = buf, *next; !why && p < buf + len; p = next) {
		/* Taken before the record is parsed: parse_mop cuts its record
		 * up with NULs, whose pieces are no records of their own. */
		next = p + strlen(p) + 1;
		why = record(s, p);
	}
	if (!why && !s->argc)
		why = "empty command";
	if (why)
		spec_free(s);
	return why;
}
