/* sandbox guest init: PID 1 of the throw-away VM.
 *
 * Loads the few modules it needs, mounts the host root read-only over 9p with
 * private tmpfs on top, runs one command as the caller, relays its stdio over
 * virtio-serial ports, reports status and phase stamps, and powers off.
 * Every step is on the start-up path, so it does no more than it must.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <arpa/inet.h>
#include <stddef.h>
#include <sys/random.h>
#include <netinet/in.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>
#include <linux/random.h>

#include "protocol.h"

#define NEWROOT "/newroot"
#define MAX_GROUPS 256
#define BUFSZ MUX_MAX_PAYLOAD

extern char **environ;

static int ctl_fd = -1;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- output to the host ------------------------------------------------ */

static char early[4096]; /* stamps taken before the control port exists */
static size_t early_len;

static void write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				struct pollfd pfd = {fd, POLLOUT, 0};
				poll(&pfd, 1, -1);
				continue;
			}
			return;
		}
		p += w;
		n -= (size_t)w;
	}
}

static void ctl_send(const char *fmt, ...)
{
	char line[1024];
	int n = snprintf(line, sizeof line, "%llu ", (unsigned long long)now_ns());
	va_list ap;
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
	va_end(ap);
	if (n >= (int)sizeof line - 1)
		n = (int)sizeof line - 2;
	line[n++] = '\n';
	if (ctl_fd >= 0)
		write_all(ctl_fd, line, (size_t)n);
	else if (early_len + (size_t)n <= sizeof early) {
		memcpy(early + early_len, line, (size_t)n);
		early_len += (size_t)n;
	}
}

static void stamp(const char *phase)
{
	ctl_send("T %s %llu", phase, (unsigned long long)now_ns());
}

static void power_off(void)
{
	reboot(RB_POWER_OFF);
	/* Without a power-off method the kernel halts; a reset with
	 * -no-reboot ends QEMU just as well. */
	reboot(RB_AUTOBOOT);
	for (;;)
		pause();
}

/* Fatal set-up error: tell the host (or the console) and stop the VM. */
static void die(const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (ctl_fd >= 0)
		ctl_send("E %s", msg);
	int con = open("/dev/console", O_WRONLY | O_NOCTTY);
	if (con >= 0) {
		dprintf(con, "sandbox-init: %s\n", msg);
		close(con);
	}
	power_off();
}

/* ---- modules ----------------------------------------------------------- */

static char cmdline[8192];

static void read_cmdline(void)
{
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	ssize_t n = read(fd, cmdline, sizeof cmdline - 1);
	close(fd);
	cmdline[n > 0 ? n : 0] = 0;
}

/* Module options given on the kernel command line as "mod.key=val", passed
 * on the way modprobe would (QEMU's microvm puts virtio_mmio.device= there). */
static void module_params(const char *mod, char *out, size_t outsz)
{
	size_t ml = strlen(mod), o = 0;
	out[0] = 0;
	for (const char *p = cmdline; *p;) {
		while (*p == ' ' || *p == '\n')
			p++;
		const char *e = p;
		while (*e && *e != ' ' && *e != '\n')
			e++;
		if ((size_t)(e - p) > ml + 1 && !strncmp(p, mod, ml) && p[ml] == '.') {
			size_t l = (size_t)(e - p) - ml - 1;
			if (o + l + 2 < outsz) {
				memcpy(out + o, p + ml + 1, l);
				o += l;
				out[o++] = ' ';
				out[o] = 0;
			}
		}
		p = e;
	}
}

/* /modules/order lists "name file" lines in dependency order. */
static void load_modules(void)
{
	int fd = open("/modules/order", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	char list[4096];
	ssize_t n = read(fd, list, sizeof list - 1);
	close(fd);
	if (n <= 0)
		return;
	list[n] = 0;
	char *save = NULL;
	for (char *line = strtok_r(list, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char *file = strchr(line, ' ');
		if (!file)
			continue;
		*file++ = 0;
		char path[256], params[1024];
		snprintf(path, sizeof path, "/modules/%s", file);
		module_params(line, params, sizeof params);
		int mfd = open(path, O_RDONLY | O_CLOEXEC);
		if (mfd < 0)
			die("cannot open module %s: %s", path, strerror(errno));
		if (syscall(SYS_finit_module, mfd, params, 0) != 0 && errno != EEXIST)
			die("cannot load module %s: %s", line, strerror(errno));
		close(mfd);
		/* The file's pages in the initramfs are guest RAM the kernel
		 * can now reuse instead of touching new pages. */
		unlink(path);
	}
}

/* ---- virtio-serial ports ----------------------------------------------- */

static int port_match(const char *name, int nr)
{
	int dev, p;
	char tail;
	return sscanf(name, "vport%dp%d%c", &dev, &p, &tail) == 2 && p == nr;
}

static int find_port(int nr, char *path, size_t sz)
{
	DIR *d = opendir("/dev");
	if (!d)
		return 0;
	struct dirent *de;
	int found = 0;
	while ((de = readdir(d))) {
		if (port_match(de->d_name, nr)) {
			snprintf(path, sz, "/dev/%s", de->d_name);
			found = 1;
			break;
		}
	}
	closedir(d);
	return found;
}

/* Ports appear asynchronously after virtio_console binds; wait for the
 * device nodes with inotify rather than sleeping a fixed time. */
static int open_port(int nr, int flags, int timeout_ms)
{
	char path[300];
	int ino = -1;
	uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000ull;
	for (;;) {
		if (find_port(nr, path, sizeof path)) {
			int fd = open(path, flags | O_CLOEXEC | O_NOCTTY);
			if (ino >= 0)
				close(ino);
			return fd;
		}
		if (ino < 0) {
			ino = inotify_init1(IN_CLOEXEC);
			inotify_add_watch(ino, "/dev", IN_CREATE);
			continue; /* re-scan: the node may have come before the watch */
		}
		uint64_t t = now_ns();
		if (t >= deadline) {
			close(ino);
			return -1;
		}
		struct pollfd pfd = {ino, POLLIN, 0};
		if (poll(&pfd, 1, (int)((deadline - t) / 1000000ull) + 1) > 0) {
			char buf[4096];
			if (read(ino, buf, sizeof buf) < 0 && errno != EINTR)
				break;
		}
	}
	if (ino >= 0)
		close(ino);
	return -1;
}

/* ---- the command's spec ------------------------------------------------ */

struct rlim {
	int resource;
	struct rlimit lim;
};

/* One step of the host's mount plan (sandbox/mounts.py), done in order. */
struct mop {
	char op;
	const char *tag, *path;
	mode_t mode;
	const char *size;
};

struct spec {
	char **argv, **envp; /* as many as the host sent: its execve took them */
	int argc, envc;
	const char *cwd, *home;
	uid_t uid;
	gid_t gid;
	gid_t *groups;
	int ngroups;
	mode_t umask;
	int tty, rows, cols, x11, xpra, rw_share, closed;
	const char *entropy;   /* hex: host randomness for a restored guest's pool */
	const char *net;       /* "<mac> <ipv4/len|dhcp|-> <gw4|-> <ipv6 0|1|2> <wait_ms> <mtu> <mode>" */
	const char **dns;      /* name servers for resolv.conf */
	int ndns;
	const char *search;
	const char *hostname;  /* the sandbox's name, or NULL */
	long long realtime_ns; /* the host's wall clock when it sent the spec */
	struct rlim *rlims;
	int nrlims;
	struct mop *mops;
	int nmops;
};

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

static void *xcalloc(size_t n, size_t sz)
{
	void *p = calloc(n ? n : 1, sz);
	if (!p)
		die("out of memory reading the spec");
	return p;
}

/* "<resource> <soft> <hard>", -1 for unlimited. */
static void parse_rlimit(const char *v, struct rlim *r)
{
	long long soft, hard;
	if (sscanf(v, "%d %lld %lld", &r->resource, &soft, &hard) != 3)
		die("bad rlimit record");
	r->lim.rlim_cur = soft < 0 ? RLIM_INFINITY : (rlim_t)soft;
	r->lim.rlim_max = hard < 0 ? RLIM_INFINITY : (rlim_t)hard;
}

/* "<op>:<tag>:<octal mode>:<size>:<path>"; the path may hold any byte but NUL. */
static void parse_mop(char *v, struct mop *m)
{
	char *f[4];
	for (int i = 0; i < 4; i++) {
		f[i] = v;
		v = strchr(v, ':');
		if (!v)
			die("bad mount record");
		*v++ = 0;
	}
	m->op = f[0][0];
	m->tag = f[1];
	m->mode = *f[2] ? (mode_t)strtoul(f[2], NULL, 8) : 0755;
	m->size = f[3];
	m->path = v;
	if (m->path[0] != '/')
		die("mount path is not absolute");
}

static long meminfo_kb(const char *key)
{
	char buf[4096];
	int fd = open("/proc/meminfo", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	buf[n > 0 ? n : 0] = 0;
	char *p = strstr(buf, key);
	return p ? atol(p + strlen(key)) : 0;
}

/* Before a template is taken: fill the free memory with zeros (the kernel
 * clears every page it hands out) and give it back, so that the pages the
 * boot used and freed hold no stale data and the host stores them as holes:
 * a smaller template, copied faster into every run.
 *
 * A child does it, marked the OOM killer's first choice: MemFree counts
 * pages no ordinary allocation may take (the DMA zones' reserves and the
 * watermarks grow with the guest's memory), and PID 1 itself running out
 * panicked the guest ("System is deadlocked on memory") from --memory 768M
 * up.  The margin keeps the OOM killer out of it; if it still comes, it
 * ends the child, whose pages are zeroed all the same. */
static void zero_free_memory(void)
{
	enum { CHUNK = 16 << 20 };
	pid_t pid = fork();
	if (pid < 0)
		return;
	if (pid > 0) {
		while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
			;
		return;
	}
	int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
	if (fd >= 0) {
		write_all(fd, "1000", 4);
		close(fd);
	}
	long total_kb = meminfo_kb("MemTotal:");
	long spare_kb = (16 << 10) + total_kb / 16;
	long chunks = (meminfo_kb("MemFree:") - spare_kb) / (CHUNK >> 10);
	for (long n = 0; n < chunks; n++)
		if (mmap(NULL, CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0) == MAP_FAILED)
			break;
	_exit(0);
}

static void read_spec(struct spec *s)
{
	char hdr[32];
	size_t len;
	for (;;) {
		size_t i = 0;
		while (i < sizeof hdr - 1) { /* one byte at a time: stop at the newline */
			read_exact(ctl_fd, hdr + i, 1);
			if (hdr[i++] == '\n')
				break;
		}
		hdr[i] = 0;
		if (strcmp(hdr, "ZERO\n") != 0)
			break;
		int dc = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);
		if (dc >= 0) {
			write_all(dc, "3", 1);
			close(dc);
		}
		zero_free_memory();
		stamp("ready");
	}
	if (sscanf(hdr, "SPEC %zu", &len) != 1)
		die("bad spec header");
	char *buf = malloc(len + 1);
	if (!buf)
		die("out of memory");
	read_exact(ctl_fd, buf, len);
	buf[len] = 0;
	memset(s, 0, sizeof *s);
	s->umask = 022;
	size_t counts[256] = {0};
	for (char *p = buf; p < buf + len; p += strlen(p) + 1)
		counts[(unsigned char)*p]++;
	s->argv = xcalloc(counts['A'] + 1, sizeof *s->argv);
	s->envp = xcalloc(counts['E'] + 1, sizeof *s->envp);
	s->groups = xcalloc(counts['S'], sizeof *s->groups);
	s->rlims = xcalloc(counts['Z'], sizeof *s->rlims);
	s->mops = xcalloc(counts['m'], sizeof *s->mops);
	s->dns = xcalloc(counts['d'] + 1, sizeof *s->dns);
	for (char *p = buf; p < buf + len; p += strlen(p) + 1) {
		char *v = p + 1;
		switch (*p) {
		case 'A': s->argv[s->argc++] = v; break;
		case 'E': s->envp[s->envc++] = v; break;
		case 'C': s->cwd = v; break;
		case 'H': s->home = v; break;
		case 'U': s->uid = (uid_t)strtoul(v, NULL, 10); break;
		case 'G': s->gid = (gid_t)strtoul(v, NULL, 10); break;
		case 'S': s->groups[s->ngroups++] = (gid_t)strtoul(v, NULL, 10); break;
		case 'M': s->umask = (mode_t)strtoul(v, NULL, 8); break;
		case 'T': s->tty = atoi(v); break;
		case 'F': s->closed = atoi(v); break;
		case 'R': s->rows = atoi(v); break;
		case 'W': s->cols = atoi(v); break;
		case 'X': s->x11 = atoi(v) + 1; break;
		case 'Y': s->xpra = 1; break;
		case 'Z': parse_rlimit(v, &s->rlims[s->nrlims++]); break;
		case 'r': s->entropy = v; break;
		case 't': s->realtime_ns = atoll(v); break;
		case 'n': s->net = v; break;
		case 'd': s->dns[s->ndns++] = v; break;
		case 's': s->search = v; break;
		case 'N': s->hostname = v; break;
		case 'm':
			parse_mop(v, &s->mops[s->nmops]);
			if (s->mops[s->nmops].op == MOP_SHARE_RW)
				s->rw_share = 1;
			s->nmops++;
			break;
		}
	}
	if (!s->argc)
		die("empty command");
}

/* The sandbox's name, as a container gets its own: prompts, logs and
 * `hostname` say which sandbox this is (the kernel's is "(none)"). */
static void set_hostname(const char *name)
{
	if (!name)
		return;
	size_t len = strlen(name);
	if (len > HOSTNAME_MAX)
		die("host name '%s' is longer than %d bytes", name, HOSTNAME_MAX);
	if (sethostname(name, len) != 0)
		die("sethostname %s: %s", name, strerror(errno));
}

/* ---- filesystems ------------------------------------------------------- */

static void xmount(const char *src, const char *dst, const char *type, unsigned long fl, const char *opts)
{
	if (mount(src, dst, type, fl, opts) != 0)
		die("mount %s on %s: %s", type, dst, strerror(errno));
}

static void tmpfs(const char *dst, const char *opts)
{
	xmount("tmpfs", dst, "tmpfs", MS_NOSUID | MS_NODEV, opts);
}

/* mkdir -p; returns 0 or the errno of the first directory that could not be made. */
static int make_dirs(const char *path, mode_t mode)
{
	char p[4200];
	snprintf(p, sizeof p, "%s", path);
	for (char *c = p + 1; *c; c++) {
		if (*c != '/')
			continue;
		*c = 0;
		if (mkdir(p, 0755) != 0 && errno != EEXIST)
			return errno;
		*c = '/';
	}
	if (mkdir(p, mode) != 0 && errno != EEXIST)
		return errno;
	return 0;
}

static void mount_point(const char *target, const char *guest_path)
{
	int e = make_dirs(target, 0755);
	if (e)
		die("cannot make %s in the sandbox: %s%s", guest_path, strerror(e),
		    e == EROFS ? " (its parent is on the read-only root)" : "");
}

#define NINEP_RO "trans=virtio,version=9p2000.L,msize=524288,cache=loose,access=client"
#define NINEP_RW "trans=virtio,version=9p2000.L,msize=524288,cache=mmap,access=client"

static int nstage;

/* A fresh directory under /stage, the init's own tmpfs that the command
 * never sees: it is left behind in the initramfs at the switch of root. */
static void stage_dir(char *out, size_t sz, char kind)
{
	snprintf(out, sz, "/stage/%c%d", kind, nstage);
	if (mkdir(out, 0755) != 0)
		die("mkdir %s: %s", out, strerror(errno));
}

/* Copy-on-write `lower` at `target`: writes land in the init's tmpfs. */
static void overlay(const char *lower, const char *target)
{
	char up[32], wk[32], opts[128];
	struct stat st;
	if (stat(lower, &st) != 0)
		die("stat %s: %s", lower, strerror(errno));
	stage_dir(up, sizeof up, 'u');
	stage_dir(wk, sizeof wk, 'w');
	nstage++;
	/* The merged root takes the upper dir's owner and mode: the lower's. */
	if (chown(up, st.st_uid, st.st_gid) != 0 || chmod(up, st.st_mode & 07777) != 0)
		die("upper dir: %s", strerror(errno));
	snprintf(opts, sizeof opts, "lowerdir=%s,upperdir=%s,workdir=%s", lower, up, wk);
	xmount("overlay", target, "overlay", MS_NOSUID | MS_NODEV, opts);
}

static void do_mop(const struct spec *s, const struct mop *m)
{
	char target[4200], src[4200], stage[32], opts[160];
	struct stat st;
	snprintf(target, sizeof target, NEWROOT "%s", m->path);
	switch (m->op) {
	case MOP_OVERLAY:
		/* The host's directory as it is, under the mounts made so far. */
		snprintf(src, sizeof src, "/hostroot%s", m->path);
		if (stat(src, &st) != 0 || !S_ISDIR(st.st_mode))
			return; /* absent on the host (or hidden from QEMU): absent here */
		mount_point(target, m->path);
		/* A bind gives overlayfs a path with no ',' or ':' to escape. */
		stage_dir(stage, sizeof stage, 'l');
		xmount(src, stage, NULL, MS_BIND, NULL);
		overlay(stage, target);
		break;
	case MOP_TMPFS:
		mount_point(target, m->path);
		if (*m->tag == 'u')
			snprintf(opts, sizeof opts, "mode=%o,uid=%u,gid=%u%s%s", m->mode, s->uid, s->gid, *m->size ? ",size=" : "", m->size);
		else
			snprintf(opts, sizeof opts, "mode=%o%s%s", m->mode, *m->size ? ",size=" : "", m->size);
		tmpfs(target, opts);
		break;
	case MOP_SHARE_RO:
	case MOP_SHARE_RW:
		mount_point(target, m->path);
		xmount(m->tag, target, "9p", m->op == MOP_SHARE_RO ? MS_RDONLY | MS_NOSUID | MS_NODEV : MS_NOSUID | MS_NODEV,
		       m->op == MOP_SHARE_RO ? NINEP_RO : NINEP_RW);
		break;
	case MOP_SHARE_COW:
		mount_point(target, m->path);
		stage_dir(stage, sizeof stage, 's');
		nstage++;
		xmount(m->tag, stage, "9p", MS_RDONLY | MS_NOSUID | MS_NODEV, NINEP_RO);
		overlay(stage, target);
		break;
	case MOP_HOME:
		/* A home the host does not have: made, empty, where it can be. */
		if (stat(target, &st) != 0 && make_dirs(target, 0700) == 0)
			if (chown(target, s->uid, s->gid) != 0)
				die("chown %s: %s", target, strerror(errno));
		break;
	case MOP_HIDE_DIR:
		if (stat(target, &st) == 0 && S_ISDIR(st.st_mode)) {
			snprintf(opts, sizeof opts, "mode=700,uid=%u,gid=%u,size=1m", s->uid, s->gid);
			tmpfs(target, opts);
		}
		break;
	case MOP_HIDE_FILE:
		if (lstat(target, &st) == 0 && !S_ISDIR(st.st_mode)) {
			if (access("/stage/empty", F_OK) != 0) {
				int fd = open("/stage/empty", O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
				if (fd < 0 || fchown(fd, s->uid, s->gid) != 0)
					die("/stage/empty: %s", strerror(errno));
				close(fd);
			}
			/* Never through a symlink (the host resolved the secret's
			 * links already; this one changed since). */
			if (!S_ISLNK(st.st_mode))
				xmount("/stage/empty", target, NULL, MS_BIND, NULL);
		}
		break;
	case MOP_MKDIR:
		break; /* done before the other steps (setup_root) */
	default:
		die("unknown mount step '%c'", m->op);
	}
}

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
	dprintf(fd, "# sandbox: --net %s\n", strrchr(s->net, ' ') + 1);
	if (s->search && *s->search)
		dprintf(fd, "search %s\n", s->search);
	for (int i = 0; i < ndns; i++)
		dprintf(fd, "nameserver %s\n", dns[i]);
}

static void private_resolv_conf(const struct spec *s)
{
	int fd = open("/stage/resolv.conf", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return;
	write_resolv(fd, s, s->dns, s->ndns);
	resolv_fd = fd;
	char target[4200] = NEWROOT "/etc/resolv.conf", link[4096];
	struct stat st;
	if (lstat(target, &st) == 0 && S_ISLNK(st.st_mode)) {
		ssize_t n = readlink(target, link, sizeof link - 1);
		if (n <= 0)
			return;
		link[n] = 0;
		if (link[0] == '/') /* absolute: inside the new root, not ours */
			snprintf(target, sizeof target, NEWROOT "%s", link);
		if (stat(target, &st) != 0) { /* e.g. systemd-resolved's file in our fresh /run */
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
	if (mount("/stage/resolv.conf", target, NULL, MS_BIND, NULL) != 0)
		ctl_send("L no private resolv.conf: %s", strerror(errno));
}

/* The mounts every run has, made before a template is taken; setup_root
 * moves them into the new root with /dev and /proc. */
static void early_mounts(void)
{
	xmount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "");
	mkdir("/dev/pts", 0755);
	xmount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620");
	mkdir("/dev/shm", 01777);
	tmpfs("/dev/shm", "mode=1777");
}

static void setup_root(const struct spec *s)
{
	/* Read-only host root.  cache=loose: nothing in the guest writes it, so
	 * the page cache never needs revalidating; msize 512k cuts round trips. */
	int mkdirs = 0;
	for (int i = 0; i < s->nmops; i++)
		mkdirs += s->mops[i].op == MOP_MKDIR;
	/* The host's tree as it is, for the overlays' lower layers. */
	xmount(ROOT_TAG, "/hostroot", "9p", MS_RDONLY | MS_NOSUID, NINEP_RO);
	stamp("root_mounted");
	tmpfs("/stage", "mode=755");
	if (mkdirs) {
		/* Mount points the host does not have: the root gets a
		 * copy-on-write layer to make them in, then turns read-only. */
		overlay("/hostroot", NEWROOT);
		for (int i = 0; i < s->nmops; i++)
			if (s->mops[i].op == MOP_MKDIR) {
				char target[4200];
				snprintf(target, sizeof target, NEWROOT "%s", s->mops[i].path);
				int e = make_dirs(target, 0755);
				if (e)
					die("cannot make %s in the sandbox: %s", s->mops[i].path, strerror(e));
			}
		if (mount(NULL, NEWROOT, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID, NULL) != 0)
			die("read-only root: %s", strerror(errno));
	} else {
		xmount("/hostroot", NEWROOT, NULL, MS_BIND, NULL);
	}
	/* /dev moves with its /dev/pts and /dev/shm (early_mounts). */
	if (mount("/dev", NEWROOT "/dev", NULL, MS_MOVE, NULL) != 0)
		die("move /dev: %s", strerror(errno));
	if (mount("/proc", NEWROOT "/proc", NULL, MS_MOVE, NULL) != 0)
		die("move /proc: %s", strerror(errno));
	if (mount("/sys", NEWROOT "/sys", NULL, MS_MOVE, NULL) != 0)
		die("move /sys: %s", strerror(errno));
	for (int i = 0; i < s->nmops; i++)
		do_mop(s, &s->mops[i]);
	private_resolv_conf(s);
	if (chdir(NEWROOT) || mount(".", "/", NULL, MS_MOVE, NULL) || chroot(".") || chdir("/"))
		die("switch root: %s", strerror(errno));
}

/* Loopback is up in every sandbox: local servers and their clients work. */
static void loopback_up(void)
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

/* ---- the network (--net) ------------------------------------------------ */

#define NET_IF "eth0"

struct netcfg {
	char mac[32], ipv4[64], gw4[64], mode[64];
	int ipv6, wait_ms, mtu;
	unsigned char hw[6];
};
static struct netcfg net;

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

static void ipv4_configure(int fd, in_addr_t addr, int plen, in_addr_t gw)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	set_in_addr(&ifr.ifr_addr, addr);
	if (if_ioctl(fd, SIOCSIFADDR, &ifr) != 0)
		die("--net %s: cannot set the address: %s", net.mode, strerror(errno));
	set_in_addr(&ifr.ifr_netmask, plen ? htonl(~0u << (32 - plen)) : 0);
	if (if_ioctl(fd, SIOCSIFNETMASK, &ifr) != 0)
		die("--net %s: cannot set the netmask: %s", net.mode, strerror(errno));
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
		die("--net %s: cannot add the default route: %s", net.mode, strerror(errno));
}

/* Bring the interface up as early as possible (before the root is
 * mounted), so that the router's advertisement arrives meanwhile. */
static void net_start(const struct spec *s)
{
	if (!s->net)
		return;
	char ipv6[8];
	if (sscanf(s->net, "%31s %63s %63s %7s %d %d %63s", net.mac, net.ipv4, net.gw4, ipv6, &net.wait_ms, &net.mtu, net.mode) != 7 ||
	    sscanf(net.mac, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &net.hw[0], &net.hw[1], &net.hw[2], &net.hw[3], &net.hw[4], &net.hw[5]) != 6)
		die("bad network spec '%s'", s->net);
	net.ipv6 = atoi(ipv6); /* 0: none, 1: required, 2: if the LAN offers it */
	/* The driver registers the interface as it probes the device, during
	 * its module's load; a moment's grace all the same. */
	for (int i = 0; !if_nametoindex(NET_IF); i++) {
		if (i == 500)
			die("--net %s: the guest has no network interface %s", net.mode, NET_IF);
		usleep(2000);
	}
	/* SLAAC without duplicate-address detection (the host hands out
	 * unique MACs), and a router solicitation at once, not after the
	 * standard's random delay of up to a second. */
	ipv6_conf("all", "accept_dad", "0"); /* the kernel does DAD if either says so */
	ipv6_conf(NET_IF, "accept_dad", "0");
	ipv6_conf(NET_IF, "dad_transmits", "0");
	ipv6_conf(NET_IF, "router_solicitation_delay", "0");
	ipv6_conf(NET_IF, "accept_ra", net.ipv6 ? "1" : "0");
	if (!net.ipv6)
		ipv6_conf(NET_IF, "disable_ipv6", "1");
	ipv6_conf(NET_IF, "autoconf", net.ipv6 ? "1" : "0");
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	/* The MAC is this sandbox's: a restored guest's device still has the
	 * template's. */
	ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
	memcpy(ifr.ifr_hwaddr.sa_data, net.hw, 6);
	if (fd < 0 || if_ioctl(fd, SIOCSIFHWADDR, &ifr) != 0)
		die("--net %s: cannot set the MAC address %s: %s", net.mode, net.mac, strerror(errno));
	if (net.mtu) {
		ifr.ifr_mtu = net.mtu;
		if (if_ioctl(fd, SIOCSIFMTU, &ifr) != 0)
			ctl_send("L --net %s: cannot set the MTU to %d: %s", net.mode, net.mtu, strerror(errno));
	}
	if (if_ioctl(fd, SIOCGIFFLAGS, &ifr) != 0)
		die("--net %s: %s: %s", net.mode, NET_IF, strerror(errno));
	ifr.ifr_flags |= IFF_UP;
	if (if_ioctl(fd, SIOCSIFFLAGS, &ifr) != 0)
		die("--net %s: cannot bring %s up: %s", net.mode, NET_IF, strerror(errno));
	char *slash = strchr(net.ipv4, '/');
	if (slash) {
		*slash = 0;
		in_addr_t a = inet_addr(net.ipv4), gw = strcmp(net.gw4, "-") ? inet_addr(net.gw4) : 0;
		ipv4_configure(fd, a, atoi(slash + 1), gw);
	}
	close(fd);
}

/* ---- DHCP (IPv4 on a bridge: the LAN's server assigns the address) -------- */

struct dhcp_msg {
	uint8_t op, htype, hlen, hops;
	uint32_t xid;
	uint16_t secs, flags;
	uint32_t ciaddr, yiaddr, siaddr, giaddr;
	uint8_t chaddr[16], sname[64], file[128];
	uint8_t magic[4], options[312];
};

struct dhcp_lease {
	in_addr_t addr, server, mask, router;
	char dns[3][16];
	int ndns;
};

static size_t dhcp_request(struct dhcp_msg *m, uint32_t xid, int type, const struct dhcp_lease *offer)
{
	memset(m, 0, sizeof *m);
	m->op = 1, m->htype = 1, m->hlen = 6, m->xid = xid, m->flags = htons(0x8000); /* answer by broadcast */
	memcpy(m->chaddr, net.hw, 6);
	static const uint8_t magic[4] = {99, 130, 83, 99};
	memcpy(m->magic, magic, 4);
	uint8_t *o = m->options;
	*o++ = 53, *o++ = 1, *o++ = (uint8_t)type;
	if (offer) {
		*o++ = 50, *o++ = 4, memcpy(o, &offer->addr, 4), o += 4;
		*o++ = 54, *o++ = 4, memcpy(o, &offer->server, 4), o += 4;
	}
	*o++ = 55, *o++ = 3, *o++ = 1, *o++ = 3, *o++ = 6;
	*o++ = 255;
	return (size_t)(o - (uint8_t *)m);
}

/* The message's type (0: not ours or malformed), its fields in `l`. */
static int dhcp_parse(const struct dhcp_msg *m, ssize_t n, uint32_t xid, struct dhcp_lease *l)
{
	if (n < (ssize_t)offsetof(struct dhcp_msg, options) || m->op != 2 || m->xid != xid || memcmp(m->chaddr, net.hw, 6))
		return 0;
	int type = 0;
	memset(l, 0, sizeof *l);
	l->addr = m->yiaddr;
	const uint8_t *o = m->options, *end = (const uint8_t *)m + n;
	while (o < end && *o != 255) {
		if (*o == 0) {
			o++;
			continue;
		}
		if (o + 2 > end || o + 2 + o[1] > end)
			break;
		const uint8_t *v = o + 2;
		int len = o[1];
		if (o[0] == 53 && len == 1)
			type = v[0];
		else if (o[0] == 54 && len == 4)
			memcpy(&l->server, v, 4);
		else if (o[0] == 1 && len == 4)
			memcpy(&l->mask, v, 4);
		else if (o[0] == 3 && len >= 4)
			memcpy(&l->router, v, 4);
		else if (o[0] == 6)
			for (int i = 0; i + 4 <= len && l->ndns < 3; i += 4) {
				struct in_addr a;
				memcpy(&a, v + i, 4);
				snprintf(l->dns[l->ndns++], 16, "%s", inet_ntoa(a));
			}
		o += 2 + len;
	}
	return type;
}

static int dhcp(uint64_t deadline, struct dhcp_lease *lease)
{
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), on = 1;
	struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons(68)};
	struct sockaddr_in server = {.sin_family = AF_INET, .sin_port = htons(67), .sin_addr.s_addr = INADDR_BROADCAST};
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_BROADCAST, &on, sizeof on) ||
	    setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, NET_IF, sizeof NET_IF) || bind(fd, (struct sockaddr *)&me, sizeof me))
		die("--net %s: DHCP socket: %s", net.mode, strerror(errno));
	uint32_t xid;
	if (getrandom(&xid, sizeof xid, 0) != sizeof xid)
		xid = (uint32_t)now_ns();
	struct dhcp_msg m;
	struct dhcp_lease offer;
	int want = 2; /* an offer, then an ack */
	uint64_t resend = 0;
	while (now_ns() < deadline) {
		if (now_ns() >= resend) {
			size_t len = dhcp_request(&m, xid, want == 2 ? 1 : 3, want == 2 ? NULL : &offer);
			sendto(fd, &m, len, 0, (struct sockaddr *)&server, sizeof server);
			resend = now_ns() + 1000000000ull;
		}
		struct pollfd p = {fd, POLLIN, 0};
		uint64_t until = resend < deadline ? resend : deadline, t = now_ns();
		if (poll(&p, 1, until > t ? (int)((until - t) / 1000000 + 1) : 0) <= 0)
			continue;
		ssize_t n = recv(fd, &m, sizeof m, 0);
		int type = dhcp_parse(&m, n, xid, want == 2 ? &offer : lease);
		if (type == 2 && want == 2 && offer.server) {
			want = 5;
			resend = 0;
		} else if (type == 5 && want == 5) {
			close(fd);
			return 1;
		} else if (type == 6) { /* NAK: start over */
			want = 2;
			resend = 0;
		}
	}
	close(fd);
	return 0;
}

/* ---- waiting for usable addresses ------------------------------------------ */

/* A global, non-tentative IPv6 address on the interface, and a default route. */
static int ipv6_ready(void)
{
	char buf[4096];
	int have_addr = 0, have_route = 0;
	int fd = open("/proc/net/if_inet6", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		ssize_t n = read(fd, buf, sizeof buf - 1);
		close(fd);
		buf[n > 0 ? n : 0] = 0;
		char *save = NULL;
		for (char *l = strtok_r(buf, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
			char addr[40], ifname[32];
			unsigned idx, plen, scope, flags;
			if (sscanf(l, "%39s %x %x %x %x %31s", addr, &idx, &plen, &scope, &flags, ifname) == 6 &&
			    !strcmp(ifname, NET_IF) && scope == 0 && !(flags & 0x40 /* IFA_F_TENTATIVE */))
				have_addr = 1;
		}
	}
	fd = open("/proc/net/ipv6_route", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		static char rbuf[16384];
		ssize_t n = read(fd, rbuf, sizeof rbuf - 1);
		close(fd);
		rbuf[n > 0 ? n : 0] = 0;
		char *save = NULL;
		for (char *l = strtok_r(rbuf, "\n", &save); l; l = strtok_r(NULL, "\n", &save))
			if (!strncmp(l, "00000000000000000000000000000000 00 ", 36) && strstr(l, " " NET_IF))
				have_route = 1;
	}
	return have_addr && have_route;
}

/* The command starts only once its addresses are usable. */
static void net_wait(const struct spec *s)
{
	if (!s->net)
		return;
	uint64_t deadline = now_ns() + (uint64_t)net.wait_ms * 1000000ull;
	int have4 = 0;
	if (!strcmp(net.ipv4, "dhcp")) {
		struct dhcp_lease l;
		if (dhcp(deadline, &l)) {
			int plen = 0;
			for (uint32_t m = ntohl(l.mask ? l.mask : htonl(0xffffff00)); m & 0x80000000u; m <<= 1)
				plen++;
			int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
			ipv4_configure(fd, l.addr, plen, l.router);
			close(fd);
			if (!s->ndns && l.ndns && resolv_fd >= 0) {
				const char *d[3] = {l.dns[0], l.dns[1], l.dns[2]};
				write_resolv(resolv_fd, s, d, l.ndns);
			}
			struct in_addr a = {l.addr};
			ctl_send("L --net %s: DHCP gave %s/%d", net.mode, inet_ntoa(a), plen);
			have4 = 1;
		} else if (!(net.ipv6 && ipv6_ready())) {
			die("--net %s: no DHCP answer within %.1f s (is there a DHCP server on the bridge?)", net.mode, net.wait_ms / 1000.0);
		} else {
			ctl_send("L --net %s: no DHCP answer: IPv6 only", net.mode);
		}
	}
	if (net.ipv6 == 2 && have4) {
		/* Optional IPv6: the RA has been on its way since the link came up. */
		uint64_t grace = now_ns() + 1000000000ull;
		if (grace < deadline)
			deadline = grace;
	}
	if (net.ipv6) {
		while (!ipv6_ready()) {
			if (now_ns() >= deadline) {
				if (net.ipv6 == 2) {
					ctl_send("L --net %s: no IPv6 router advertisement: IPv4 only", net.mode);
					break;
				}
				die("--net %s: no IPv6 address from a router advertisement within %.1f s", net.mode, net.wait_ms / 1000.0);
			}
			usleep(2000);
		}
	}
	stamp("net_ready");
}

/* ---- the refusing resolver ------------------------------------------------ */

static int dns_fd = -1, dns_told;

static void dns_setup(void)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(53), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	dns_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (dns_fd >= 0 && bind(dns_fd, (struct sockaddr *)&a, sizeof a) != 0) {
		close(dns_fd);
		dns_fd = -1;
	}
}

/* Answer REFUSED, and tell the host the first name asked for: a command
 * that fails after a lookup gets a hint that there is no network. */
static void dns_answer(void)
{
	unsigned char q[512];
	struct sockaddr_storage from;
	socklen_t fl = sizeof from;
	ssize_t n = recvfrom(dns_fd, q, sizeof q, 0, (struct sockaddr *)&from, &fl);
	if (n < 12)
		return;
	char name[256];
	size_t off = 12, nl = 0;
	if (q[4] == 0 && q[5] == 1) {
		while (off < (size_t)n && q[off] && !(q[off] & 0xc0) && off + 1 + q[off] <= (size_t)n) {
			for (size_t i = 0; i < q[off] && nl < sizeof name - 2; i++) {
				unsigned char c = q[off + 1 + i];
				name[nl++] = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ? (char)c : '?';
			}
			name[nl++] = '.';
			off += 1 + q[off];
		}
		if (off < (size_t)n && q[off] == 0 && off + 5 <= (size_t)n)
			off += 5;
		else
			off = 12, nl = 0;
	}
	if (off == 12)
		q[4] = q[5] = 0;
	q[2] = (unsigned char)((q[2] & 0x79) | 0x80); /* a response; opcode and RD kept */
	q[3] = 0x85;                                  /* RA, REFUSED */
	memset(q + 6, 0, 6);
	sendto(dns_fd, q, off, 0, (struct sockaddr *)&from, fl);
	if (nl && !dns_told) {
		dns_told = 1;
		name[nl > 1 ? nl - 1 : nl] = 0;
		ctl_send("N %s", name);
	}
}

static unsigned long oom_kills(void)
{
	char buf[8192];
	int fd = open("/proc/vmstat", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	buf[n > 0 ? n : 0] = 0;
	char *p = strstr(buf, "\noom_kill ");
	return p ? strtoul(p + 10, NULL, 10) : 0;
}

/* ---- the command -------------------------------------------------------- */

static int set_nonblock(int fd)
{
	return fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

struct child {
	pid_t pid;
	int in_w, out_r, err_r, pty;
};

/* What the child tells its parent when it cannot run the command. */
struct exec_error {
	int stage, err;
};

static void child_fail(int errpipe, int stage, int code)
{
	struct exec_error e = {stage, errno};
	write(errpipe, &e, sizeof e);
	_exit(code);
}

/* `cmd >&-` on the host (or for `sandbox exec`): the process finds that
 * fd closed (EBADF), not a pipe to nowhere.  `mask`: bit 1 << fd. */
static void close_stdio(int mask)
{
	for (int i = 0; i < 3; i++)
		if (mask & (1 << i))
			close(i);
}

static void child_exec(const struct spec *s, int fds[3], int pty_slave, int errpipe)
{
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	/* init ignores SIGPIPE for itself; an ignored signal survives exec, and
	 * `cmd | head` must end cmd by SIGPIPE as it would on the host. */
	signal(SIGPIPE, SIG_DFL);
	setsid();
	if (pty_slave >= 0)
		ioctl(pty_slave, TIOCSCTTY, 0);
	for (int i = 0; i < 3; i++)
		if (dup2(fds[i], i) < 0)
			_exit(125);
	close_stdio(s->closed);
	/* The host's limits, the stack's first: it sets how much argv and
	 * environment execve takes, and the host's execve took all of it. */
	for (int i = 0; i < s->nrlims; i++)
		if (setrlimit(s->rlims[i].resource, &s->rlims[i].lim) != 0)
			child_fail(errpipe, EXEC_STAGE_RLIMIT, 125);
	if (setgroups((size_t)s->ngroups, s->groups) || setgid(s->gid) || setuid(s->uid))
		child_fail(errpipe, EXEC_STAGE_CREDS, 125);
	umask(s->umask);
	if (chdir(s->cwd ? s->cwd : "/") != 0)
		child_fail(errpipe, EXEC_STAGE_CWD, 125);
	environ = (char **)s->envp; /* execvpe searches the PATH of environ */
	execvpe(s->argv[0], (char **)s->argv, (char **)s->envp);
	child_fail(errpipe, EXEC_STAGE_EXEC, errno == ENOENT ? 127 : 126);
}

/* Start the command; returns 0, or an exit code (126/127) on failure. */
static int spawn(struct spec *s, struct child *c)
{
	int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, ep[2];
	int master = -1, slave = -1;
	c->in_w = c->out_r = c->err_r = c->pty = -1;
	if (s->tty & (TTY_STDIN | TTY_STDOUT | TTY_STDERR)) {
		master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (master < 0 || grantpt(master) || unlockpt(master))
			die("pty: %s", strerror(errno));
		slave = open(ptsname(master), O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (slave < 0)
			die("pty slave: %s", strerror(errno));
		if (s->rows && s->cols) {
			struct winsize ws = {(unsigned short)s->rows, (unsigned short)s->cols, 0, 0};
			ioctl(master, TIOCSWINSZ, &ws);
		}
		if (fchown(slave, s->uid, (gid_t)-1) != 0)
			die("pty chown: %s", strerror(errno));
		c->pty = master;
	}
	int fds[3];
	if (s->tty & TTY_STDIN) fds[0] = slave;
	else { if (pipe2(in, O_CLOEXEC)) die("pipe"); fds[0] = in[0]; c->in_w = in[1]; }
	if (s->tty & TTY_STDOUT) fds[1] = slave;
	else { if (pipe2(out, O_CLOEXEC)) die("pipe"); fds[1] = out[1]; c->out_r = out[0]; }
	if (s->tty & TTY_STDERR) fds[2] = slave;
	else { if (pipe2(err, O_CLOEXEC)) die("pipe"); fds[2] = err[1]; c->err_r = err[0]; }
	if (pipe2(ep, O_CLOEXEC))
		die("pipe");
	stamp("command_exec");
	c->pid = fork();
	if (c->pid < 0)
		die("fork: %s", strerror(errno));
	if (c->pid == 0)
		child_exec(s, fds, slave, ep[1]);
	close(ep[1]);
	for (int i = 0; i < 3; i++)
		if (fds[i] != slave)
			close(fds[i]);
	if (slave >= 0)
		close(slave);
	struct exec_error e;
	ssize_t n;
	do
		n = read(ep[0], &e, sizeof e);
	while (n < 0 && errno == EINTR);
	close(ep[0]);
	if (n != (ssize_t)sizeof e)
		return 0;
	/* The host words the message: it has the command's name unmangled. */
	int code = e.stage != EXEC_STAGE_EXEC ? 125 : e.err == ENOENT ? 127 : 126;
	ctl_send("X %d %d %d", code, e.err, e.stage);
	return code;
}

/* ---- X11 multiplexer --------------------------------------------------- */

#define MAX_X11 64
struct xconn {
	int fd;
	uint32_t id;
	char *pend; /* bytes waiting to go to the guest client */
	size_t plen;
};
static struct xconn xconns[MAX_X11];
static int x11_listen = -1, x11_port = -1, x11_xpra;
static uint32_t x11_next_id = 1;
static char x11_in[X11_HDR + BUFSZ]; /* partial frame from the host */
static size_t x11_in_len;

static void put32(char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (char)(v >> (8 * i)); }
static uint32_t get32(const char *p)
{
	uint32_t v = 0;
	for (int i = 0; i < 4; i++) v |= (uint32_t)(unsigned char)p[i] << (8 * i);
	return v;
}

/* One frame on a multiplexed port (X11's, exec's): type, id, length, data. */
static void port_frame(int port, char type, uint32_t id, const char *data, uint32_t len)
{
	char hdr[X11_HDR];
	hdr[0] = type;
	put32(hdr + 1, id);
	put32(hdr + 5, len);
	write_all(port, hdr, X11_HDR);
	if (len)
		write_all(port, data, len);
}

static void x11_frame(char type, uint32_t id, const char *data, uint32_t len)
{
	port_frame(x11_port, type, id, data, len);
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
	for (int i = 0; i < MAX_X11; i++) {
		if (xconns[i].fd < 0) {
			xconns[i].fd = fd;
			xconns[i].id = id;
			return;
		}
	}
	close(fd);
	x11_frame(X11_CLOSE, id, NULL, 0);
}

static void x11_setup(int display, int xpra, uid_t uid, gid_t gid)
{
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
	free(x->pend);
	x->pend = NULL;
	x->plen = 0;
}

static void x11_accept(void)
{
	int fd = accept4(x11_listen, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
	if (fd < 0)
		return;
	for (int i = 0; i < MAX_X11; i++) {
		if (xconns[i].fd < 0) {
			xconns[i].fd = fd;
			xconns[i].id = x11_next_id++;
			x11_frame(X11_OPEN, xconns[i].id, NULL, 0);
			return;
		}
	}
	close(fd);
}

static void x11_client_to_host(struct xconn *x)
{
	static char buf[BUFSZ];
	ssize_t n = read(x->fd, buf, sizeof buf);
	if (n > 0)
		x11_frame(X11_DATA, x->id, buf, (uint32_t)n);
	else if (n == 0 || (errno != EAGAIN && errno != EINTR))
		x11_drop(x, 1);
}

static void x11_flush(struct xconn *x)
{
	while (x->plen) {
		ssize_t w = write(x->fd, x->pend, x->plen);
		if (w < 0) {
			if (errno != EAGAIN && errno != EINTR)
				x11_drop(x, 1);
			return;
		}
		memmove(x->pend, x->pend + w, x->plen - (size_t)w);
		x->plen -= (size_t)w;
	}
}

/* Frames from the host; returns -1 when the host side went away. */
static int x11_host_to_client(void)
{
	ssize_t n = read(x11_port, x11_in + x11_in_len, sizeof x11_in - x11_in_len);
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
	x11_in_len += (size_t)n;
	size_t off = 0;
	while (x11_in_len - off >= X11_HDR) {
		uint32_t id = get32(x11_in + off + 1), len = get32(x11_in + off + 5);
		if (len > BUFSZ)
			return -1;
		if (x11_in_len - off < X11_HDR + len)
			break;
		struct xconn *x = x11_find(id);
		char type = x11_in[off];
		if (x && type == X11_DATA) {
			char *np = realloc(x->pend, x->plen + len);
			if (np) {
				memcpy(np + x->plen, x11_in + off + X11_HDR, len);
				x->pend = np;
				x->plen += len;
				x11_flush(x);
			}
		} else if (x && type == X11_CLOSE) {
			x11_drop(x, 0);
		} else if (!x && type == X11_OPEN && x11_xpra) {
			xpra_open(id);
		}
		off += X11_HDR + len;
	}
	memmove(x11_in, x11_in + off, x11_in_len - off);
	x11_in_len -= off;
	return 0;
}

/* ---- relaying ----------------------------------------------------------- */

/* One direction of a byte stream: read from src into buf, write to dst. */
struct pump {
	int src, dst;
	char *buf;
	size_t len, off;
	int eof;
	unsigned long long count;
	int close_dst; /* close dst at EOF (the child's stdin) */
	long long limit; /* EOF after this many bytes read ("I <n>"); -1: at the source's own EOF */
	unsigned long long rcount;
};

static void pump_init(struct pump *p, int src, int dst, int close_dst)
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
	if (src >= 0) set_nonblock(src);
	if (dst >= 0) set_nonblock(dst);
}

static int pump_active(const struct pump *p) { return !p->eof || p->len > p->off; }

static void pump_finish(struct pump *p)
{
	p->eof = 1;
	p->len = p->off = 0;
	if (p->close_dst && p->dst >= 0) {
		close(p->dst);
		p->dst = -1;
	}
}

/* Move what can move without blocking; returns 1 if any byte moved. */
static int pump_run(struct pump *p)
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

static int pump_poll(const struct pump *p, struct pollfd *pfd)
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

static int child_status_code(int st)
{
	if (WIFEXITED(st))
		return WEXITSTATUS(st);
	if (WIFSIGNALED(st))
		return 128 + WTERMSIG(st);
	return 255;
}


static int child_status_code(int st);

/* ---- sandbox exec: more processes beside the command ------------------- */

struct xproc {
	uint32_t id;
	pid_t pid;         /* 0: slot free */
	int in, out, err;  /* our ends of its pipes; -1 once closed */
	char *inbuf;       /* stdin from the host not yet taken by the process */
	size_t inlen, inoff;
	int in_eof, exited, status;
};
static struct xproc xprocs[MAX_EXEC];
static int exec_port = -1;
static char exec_in[X11_HDR + BUFSZ];
static size_t exec_in_len;
static const struct spec *main_spec;

static void exec_frame(char type, uint32_t id, const char *data, uint32_t len)
{
	port_frame(exec_port, type, id, data, len);
}

static void exec_close_in(struct xproc *x)
{
	if (x->in >= 0)
		close(x->in);
	x->in = -1;
	free(x->inbuf);
	x->inbuf = NULL;
	x->inlen = x->inoff = 0;
}

/* Start one process as the command's user, in its environment and directory. */
static void exec_start(uint32_t id, char *p, uint32_t len)
{
	struct xproc *x = NULL;
	for (int i = 0; i < MAX_EXEC; i++)
		if (!xprocs[i].pid) {
			x = &xprocs[i];
			break;
		}
	const struct spec *s = main_spec;
	char **argv = calloc(len + 1, sizeof *argv), **envp = calloc(len + (size_t)s->envc + 1, sizeof *envp);
	if (!argv || !envp)
		die("out of memory starting an exec");
	int argc = 0, envc = 0;
	const char *cwd = s->cwd;
	int tty = 0, rows = 0, cols = 0, closed = 0;
	/* Given entries before the command's own: getenv finds the first. */
	for (char *q = p; q < p + len; q += strlen(q) + 1) {
		if (*q == 'A')
			argv[argc++] = q + 1;
		else if (*q == 'E')
			envp[envc++] = q + 1;
		else if (*q == 'C')
			cwd = q + 1;
		else if (*q == 'T')
			tty = 1;
		else if (*q == 'R')
			rows = atoi(q + 1);
		else if (*q == 'W')
			cols = atoi(q + 1);
		else if (*q == 'F')
			closed = atoi(q + 1);
	}
	for (int i = 0; i < s->envc; i++)
		envp[envc++] = s->envp[i];
	if (!x || !argc) {
		const char *why = x ? "sandbox: exec: no command\n" : "sandbox: exec: too many processes at once\n";
		exec_frame(EXEC_STDERR, id, why, (uint32_t)strlen(why));
		exec_frame(EXEC_EXIT, id, "125", 3);
		free(argv);
		free(envp);
		return;
	}
	int in[2], out[2], err[2], master = -1, slave = -1;
	if (tty) {
		/* -t: one terminal for all three, its size the client's. */
		master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (master < 0 || grantpt(master) || unlockpt(master) ||
		    (slave = open(ptsname(master), O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0)
			die("exec pty: %s", strerror(errno));
		if (rows && cols) {
			struct winsize ws = {(unsigned short)rows, (unsigned short)cols, 0, 0};
			ioctl(master, TIOCSWINSZ, &ws);
		}
		if (fchown(slave, s->uid, (gid_t)-1) != 0)
			die("exec pty chown: %s", strerror(errno));
		in[0] = out[1] = err[1] = slave;
		in[1] = master;
		out[0] = dup(master);
		err[0] = -1;
	} else if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC))
		die("pipe");
	pid_t pid = fork();
	if (pid == 0) {
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		signal(SIGPIPE, SIG_DFL);
		setsid();
		if (slave >= 0)
			ioctl(slave, TIOCSCTTY, 0);
		dup2(in[0], 0);
		dup2(out[1], 1);
		dup2(err[1], 2);
		close_stdio(closed);
		for (int i = 0; i < s->nrlims; i++)
			setrlimit(s->rlims[i].resource, &s->rlims[i].lim);
		if (setgroups((size_t)s->ngroups, s->groups) || setgid(s->gid) || setuid(s->uid)) {
			dprintf(2, "sandbox: exec: cannot become uid %u: %s\n", (unsigned)s->uid, strerror(errno));
			_exit(125);
		}
		umask(s->umask);
		if (chdir(cwd ? cwd : "/") != 0) {
			dprintf(2, "sandbox: exec: %s: %s\n", cwd, strerror(errno));
			_exit(125);
		}
		environ = envp;
		execvpe(argv[0], argv, envp);
		int e = errno;
		dprintf(2, "sandbox: %s: %s\n", argv[0], e == ENOENT ? "command not found" : strerror(e));
		_exit(e == ENOENT ? 127 : 126);
	}
	free(argv);
	free(envp);
	if (slave >= 0) {
		close(slave);
	} else {
		close(in[0]);
		close(out[1]);
		close(err[1]);
	}
	if (pid < 0) {
		close(in[1]);
		close(out[0]);
		if (err[0] >= 0)
			close(err[0]);
		exec_frame(EXEC_EXIT, id, "125", 3);
		return;
	}
	*x = (struct xproc){.id = id, .pid = pid, .in = in[1], .out = out[0], .err = err[0]};
	set_nonblock(x->in);
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
	while (x->in >= 0 && x->inoff < x->inlen) {
		ssize_t n = write(x->in, x->inbuf + x->inoff, x->inlen - x->inoff);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return;
			exec_close_in(x); /* it closed its stdin: the rest is dropped, as a pipe would */
			return;
		}
		x->inoff += (size_t)n;
	}
	if (x->in >= 0) {
		x->inoff = x->inlen = 0;
		if (x->in_eof)
			exec_close_in(x);
	}
}

static void exec_frames_from_host(void)
{
	ssize_t n = read(exec_port, exec_in + exec_in_len, sizeof exec_in - exec_in_len);
	if (n <= 0)
		return;
	exec_in_len += (size_t)n;
	size_t off = 0;
	while (exec_in_len - off >= X11_HDR) {
		uint32_t id = get32(exec_in + off + 1), len = get32(exec_in + off + 5);
		if (len > BUFSZ)
			die("exec frame too long");
		if (exec_in_len - off < X11_HDR + len)
			break;
		char type = exec_in[off], *data = exec_in + off + X11_HDR;
		struct xproc *x = type == EXEC_START ? NULL : exec_find(id);
		if (type == EXEC_START) {
			data[len ? len - 1 : 0] = 0;
			exec_start(id, data, len);
		} else if (x && type == EXEC_STDIN && x->in >= 0) {
			char *grown = realloc(x->inbuf, x->inlen + len);
			if (!grown)
				die("out of memory for exec input");
			x->inbuf = grown;
			memcpy(x->inbuf + x->inlen, data, len);
			x->inlen += len;
			exec_flush_in(x);
		} else if (x && type == EXEC_STDIN_EOF) {
			x->in_eof = 1;
			exec_flush_in(x);
		} else if (x && type == EXEC_SIGNAL) {
			char num[16];
			snprintf(num, sizeof num, "%.*s", (int)(len < 15 ? len : 15), data);
			kill(-x->pid, atoi(num));
		}
		off += X11_HDR + len;
	}
	memmove(exec_in, exec_in + off, exec_in_len - off);
	exec_in_len -= off;
}

/* Output of one process to the host; its exit status once all of it went. */
static void exec_output(struct xproc *x, int *fd, char type)
{
	static char buf[BUFSZ];
	ssize_t n = read(*fd, buf, sizeof buf);
	if (n > 0) {
		exec_frame(type, x->id, buf, (uint32_t)n);
		return;
	}
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	close(*fd);
	*fd = -1;
}

static void exec_reaped(pid_t pid, int status)
{
	for (int i = 0; i < MAX_EXEC; i++)
		if (xprocs[i].pid == pid) {
			xprocs[i].exited = 1;
			xprocs[i].status = child_status_code(status);
		}
}

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

static char ctl_in[4096];
static size_t ctl_in_len;

/* The complete control lines in ctl_in (messages from the host while the
 * command runs); returns 1 once the host acked ("A"). */
static int ctl_lines(struct child *c, struct pump *pumps)
{
	ctl_in[ctl_in_len] = 0;
	int acked = 0;
	long long eof_at;
	char *line = ctl_in, *nl;
	while ((nl = strchr(line, '\n'))) {
		*nl = 0;
		int a, b;
		if (sscanf(line, "K %d", &a) == 1 && c->pid > 0)
			kill(-c->pid, a);
		else if (sscanf(line, "W %d %d", &a, &b) == 2 && c->pty >= 0) {
			struct winsize ws = {(unsigned short)a, (unsigned short)b, 0, 0};
			ioctl(c->pty, TIOCSWINSZ, &ws);
		} else if (sscanf(line, "P %d", &a) == 1 && (a == 1 || a == 2)) {
			/* The host's reader is gone: the command now gets EPIPE. */
			struct pump *p = &pumps[a];
			if (p->src >= 0 && p->src != c->pty) {
				close(p->src);
				p->src = -1;
			}
			pump_finish(p);
		} else if (line[0] == 'I' && sscanf(line, "I %lld", &eof_at) == 1 && eof_at >= 0) {
			/* stdin ends after this many bytes: a backend whose port
			 * cannot be half-closed (libvirt's streams) says so here. */
			pumps[0].limit = eof_at;
			pump_run(&pumps[0]);
		} else if (line[0] == 'A')
			acked = 1;
		line = nl + 1;
	}
	ctl_in_len = (size_t)(ctl_in + ctl_in_len - line);
	memmove(ctl_in, line, ctl_in_len);
	return acked;
}

/* Read what the control port has, then handle its complete lines. */
static int handle_ctl(struct child *c, struct pump *pumps)
{
	ssize_t n = read(ctl_fd, ctl_in + ctl_in_len, sizeof ctl_in - ctl_in_len - 1);
	if (n <= 0)
		return 0;
	ctl_in_len += (size_t)n;
	return ctl_lines(c, pumps);
}

/* ---- uniqueness after a restore ---------------------------------------- */

/* Every guest restored from one template starts with the same pool and
 * the same clock: mix in the host's bytes, credit them and reseed now, so
 * that getrandom, AT_RANDOM and the command's ASLR differ between sandboxes. */
static void reseed(const char *hex)
{
	struct {
		int entropy_count, buf_size;
		unsigned char buf[64];
	} e = {0, 0, {0}};
	size_t n = 0;
	for (; hex && hex[0] && hex[1] && n < sizeof e.buf; hex += 2) {
		unsigned int b;
		if (sscanf(hex, "%2x", &b) != 1)
			break;
		e.buf[n++] = (unsigned char)b;
	}
	if (!n)
		return;
	e.buf_size = (int)n;
	e.entropy_count = (int)n * 8;
	int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		die("cannot open /dev/urandom: %s", strerror(errno));
	if (ioctl(fd, RNDADDENTROPY, &e) != 0 || ioctl(fd, RNDRESEEDCRNG) != 0)
		die("cannot reseed the guest's random pool: %s", strerror(errno));
	close(fd);
}

static void set_realtime(long long ns)
{
	if (ns <= 0)
		return;
	struct timespec ts = {(time_t)(ns / 1000000000ll), (long)(ns % 1000000000ll)};
	clock_settime(CLOCK_REALTIME, &ts);
}

/* The host answers "spec_read" with its wall clock ("C <ns>"); take it as
 * of when that stamp left, which is closer than the spec's own time (a
 * restored guest reads the spec a few hundred ms after it was written). */
static void sync_clock(uint64_t sent_ns)
{
	uint64_t deadline = now_ns() + 2000000000ull;
	for (;;) {
		ctl_in[ctl_in_len] = 0;
		char *line = ctl_in;
		for (char *nl; (nl = strchr(line, '\n')); line = nl + 1) {
			long long host_ns;
			if (sscanf(line, "C %lld", &host_ns) == 1) {
				set_realtime(host_ns + (long long)(now_ns() - sent_ns));
				size_t rest = (size_t)(ctl_in + ctl_in_len - (nl + 1));
				memmove(line, nl + 1, rest);
				ctl_in_len = (size_t)(line - ctl_in) + rest;
				return;
			}
		}
		uint64_t t = now_ns();
		if (t >= deadline || ctl_in_len >= sizeof ctl_in - 1)
			return; /* keep the spec's time */
		struct pollfd pfd = {ctl_fd, POLLIN, 0};
		if (poll(&pfd, 1, (int)((deadline - t) / 1000000ull) + 1) <= 0)
			continue;
		ssize_t n = read(ctl_fd, ctl_in + ctl_in_len, sizeof ctl_in - ctl_in_len - 1);
		if (n <= 0)
			return;
		ctl_in_len += (size_t)n;
	}
}

int main(void)
{
	uint64_t t0 = now_ns(), tsc = __rdtsc();
	ctl_send("T init_start %llu", (unsigned long long)t0);
	/* The TSC counts from vCPU reset: it dates kernel entry (timings.py). */
	ctl_send("T tsc %llu", (unsigned long long)tsc);
	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	signal(SIGPIPE, SIG_IGN);

	mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "");
	read_cmdline();
	load_modules();
	stamp("modules_loaded");

	ctl_fd = open_port(PORT_CONTROL, O_RDWR, 10000);
	if (ctl_fd < 0)
		die("control port did not appear");
	write_all(ctl_fd, early, early_len);
	/* What every run does alike is done once, before the template is
	 * taken.  (Under TCG this saved no measurable time: what these cost
	 * after a restore was mostly translating kernel paths that the run
	 * goes through anyway; benchmarks/README.md.)  Not the data ports:
	 * QEMU moves a port's host data into guest buffers only once the
	 * guest has it open, and data that came in before the template was
	 * taken (an early `sandbox exec`'s stdin) would be in the template. */
	loopback_up();
	early_mounts();
	/* Nothing of the run has entered the guest yet: a template is taken
	 * here (sandbox/qemu/template.py), and restored guests resume here. */
	stamp("ready");
	static struct spec s;
	read_spec(&s);
	reseed(s.entropy);
	set_realtime(s.realtime_ns);
	uint64_t spec_read = now_ns();
	ctl_send("T spec_read %llu", (unsigned long long)spec_read);
	main_spec = &s;
	int in_port = open_port(PORT_STDIN, O_RDONLY, 2000);
	int out_port = open_port(PORT_STDOUT, O_WRONLY, 2000);
	int err_port = open_port(PORT_STDERR, O_WRONLY, 2000);
	exec_port = open_port(PORT_EXEC, O_RDWR, 2000);
	if (in_port < 0 || out_port < 0 || err_port < 0 || exec_port < 0)
		die("stdio ports did not appear");
	set_nonblock(exec_port);

	net_start(&s);
	setup_root(&s);
	set_hostname(s.hostname);
	if (!s.net)
		dns_setup();
	if (s.x11) {
		x11_xpra = s.xpra;
		x11_setup(s.x11 - 1, s.xpra, (uid_t)s.uid, (gid_t)s.gid);
	}

	sync_clock(spec_read);
	net_wait(&s);
	struct child c;
	unsigned long ooms = oom_kills();
	int code = spawn(&s, &c);
	int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
	struct pump pumps[3];
	/* pumps[1]/[2] are indexed by the host fd they feed ("P 1", "P 2"). */
	if (c.pty >= 0) {
		int pty_in = s.tty & TTY_STDIN;
		pump_init(&pumps[0], pty_in ? in_port : -1, pty_in ? c.pty : -1, 0);
		int pty_out = (s.tty & TTY_STDOUT) ? 1 : 2;
		pump_init(&pumps[pty_out], c.pty, pty_out == 1 ? out_port : err_port, 0);
	}
	if (c.in_w >= 0)
		pump_init(&pumps[0], in_port, c.in_w, 1);
	if (c.out_r >= 0)
		pump_init(&pumps[1], c.out_r, out_port, 0);
	if (c.err_r >= 0)
		pump_init(&pumps[2], c.err_r, err_port, 0);
	if (c.pty >= 0 && (s.tty & (TTY_STDOUT | TTY_STDERR)) == (TTY_STDOUT | TTY_STDERR))
		pump_init(&pumps[2], -1, -1, 0);
	if (!(s.tty & TTY_STDIN) && c.in_w < 0)
		pump_init(&pumps[0], -1, -1, 0);

	int exited = code != 0, status = code;
	if (code)
		for (int i = 0; i < 3; i++)
			pump_init(&pumps[i], -1, -1, 0);
	/* Lines that came in with the clock's reply (a resize sent right
	 * after the spec) wait in ctl_in: not for the next read. */
	ctl_lines(&c, pumps);
	while (!exited || pump_active(&pumps[1]) || pump_active(&pumps[2])) {
		struct pollfd pfd[8 + MAX_X11 + 1 + 3 * MAX_EXEC];
		int np = 0, idx[3] = {-1, -1, -1};
		pfd[np++] = (struct pollfd){ctl_fd, POLLIN, 0};
		pfd[np++] = (struct pollfd){sfd, POLLIN, 0};
		pfd[np++] = (struct pollfd){dns_fd, POLLIN, 0}; /* -1: ignored */
		for (int i = 0; i < 3; i++)
			if (pump_poll(&pumps[i], &pfd[np]))
				idx[i] = np++;
		int ebase = np;
		pfd[np++] = (struct pollfd){exec_port, POLLIN, 0};
		for (int i = 0; i < MAX_EXEC; i++) {
			struct xproc *x = &xprocs[i];
			pfd[np++] = (struct pollfd){x->pid ? x->out : -1, POLLIN, 0};
			pfd[np++] = (struct pollfd){x->pid ? x->err : -1, POLLIN, 0};
			pfd[np++] = (struct pollfd){x->pid && x->inlen > x->inoff ? x->in : -1, POLLOUT, 0};
		}
		int xbase = np;
		if (x11_port >= 0) {
			pfd[np++] = (struct pollfd){x11_port, POLLIN, 0};
			pfd[np++] = (struct pollfd){x11_listen, POLLIN, 0};
			for (int i = 0; i < MAX_X11; i++)
				if (xconns[i].fd >= 0)
					pfd[np++] = (struct pollfd){xconns[i].fd, (short)(xconns[i].plen ? POLLOUT : POLLIN), 0};
		}
		if (exited) {
			/* The command is gone: take what it left in the pipes, but
			 * do not wait for EOF that a stray background process may
			 * hold off forever. */
			int moved = 0;
			for (int i = 1; i < 3; i++)
				moved |= pump_run(&pumps[i]);
			if (!moved) {
				for (int i = 1; i < 3; i++)
					if (pumps[i].len == pumps[i].off)
						pump_finish(&pumps[i]);
				if (!pump_active(&pumps[1]) && !pump_active(&pumps[2]))
					break;
			}
		}
		if (poll(pfd, (nfds_t)np, exited ? 10 : -1) < 0 && errno != EINTR)
			die("poll: %s", strerror(errno));
		if (pfd[0].revents)
			handle_ctl(&c, pumps);
		if (pfd[2].revents & POLLIN)
			dns_answer();
		if (pfd[1].revents & POLLIN) {
			struct signalfd_siginfo si;
			while (read(sfd, &si, sizeof si) > 0)
				;
			int st;
			pid_t p;
			while ((p = waitpid(-1, &st, WNOHANG)) > 0)
				if (p == c.pid && !exited) {
					exited = 1;
					status = child_status_code(st);
					stamp("command_exit");
				} else
					exec_reaped(p, st);
		}
		for (int i = 0; i < 3; i++)
			if (idx[i] >= 0 && pfd[idx[i]].revents)
				pump_run(&pumps[i]);
		if (pfd[ebase].revents & POLLIN)
			exec_frames_from_host();
		for (int i = 0; i < MAX_EXEC; i++) {
			struct xproc *x = &xprocs[i];
			struct pollfd *e = &pfd[ebase + 1 + 3 * i];
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
		if (x11_port >= 0) {
			if (pfd[xbase].revents && x11_host_to_client() < 0) {
				/* The display went away: clients see their connections end. */
				for (int i = 0; i < MAX_X11; i++)
					if (xconns[i].fd >= 0)
						x11_drop(&xconns[i], 0);
				close(x11_port);
				x11_port = -1;
				continue;
			}
			if (pfd[xbase + 1].revents) {
				if (x11_xpra)
					xpra_ready();
				else
					x11_accept();
			}
			for (int i = xbase + 2; i < np; i++) {
				struct xconn *x = NULL;
				for (int j = 0; j < MAX_X11; j++)
					if (xconns[j].fd == pfd[i].fd)
						x = &xconns[j];
				if (!x || !pfd[i].revents)
					continue;
				if (x->plen)
					x11_flush(x);
				else
					x11_client_to_host(x);
			}
		}
	}
	unsigned long killed = oom_kills() - ooms;
	if (killed)
		ctl_send("O %lu", killed);
	ctl_send("S %d %llu %llu", status, pumps[1].count, pumps[2].count);
	/* Wait for the host to confirm it has every byte: QEMU drops what is
	 * still queued when the machine powers off. */
	set_nonblock(ctl_fd);
	uint64_t deadline = now_ns() + 30000000000ull;
	while (now_ns() < deadline) {
		struct pollfd pfd = {ctl_fd, POLLIN, 0};
		poll(&pfd, 1, 1000);
		if (handle_ctl(&c, pumps))
			break;
	}
	/* Shared directories' writes reach the host before the last word:
	 * the host may end the machine as soon as it hears "poweroff". */
	if (s.rw_share)
		sync();
	stamp("poweroff");
	power_off();
	return 0;
}
