/* The guest's filesystem: the host's root read-only over 9p, the host's
 * mount plan (sandbox/mounts.py) carried out over it in order, and the
 * switch into it. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "init.h"

/* Read-only host root.  cache=loose: nothing in the guest writes it, so
 * the page cache never needs revalidating; msize 512k cuts round trips. */
#define NINEP_RO "trans=virtio,version=9p2000.L,msize=524288,cache=loose,access=client"
#define NINEP_RW "trans=virtio,version=9p2000.L,msize=524288,cache=mmap,access=client"

/* ---- paths (pure) ---------------------------------------------------------- */

int root_path(char *out, size_t sz, const char *guest_path)
{
	int n = snprintf(out, sz, NEWROOT "%s", guest_path);
	return n < 0 || (size_t)n >= sz ? -1 : 0;
}

void tmpfs_opts(char *out, size_t sz, const struct mop *m, uid_t uid, gid_t gid)
{
	const char *size_key = *m->size ? ",size=" : "";
	if (*m->tag == 'u') /* owned by the user */
		snprintf(out, sz, "mode=%o,uid=%u,gid=%u%s%s", m->mode, uid, gid, size_key, m->size);
	else
		snprintf(out, sz, "mode=%o%s%s", m->mode, size_key, m->size);
}

/* ---- mounting ---------------------------------------------------------- */

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
int make_dirs(const char *path, mode_t mode)
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

/* ---- the steps of the plan ------------------------------------------------ */

/* The host's directory as it is, under the mounts made so far, copy-on-write. */
static void mop_overlay(const struct mop *m, const char *target)
{
	char src[4200], stage[32];
	struct stat st;
	snprintf(src, sizeof src, "/hostroot%s", m->path);
	if (stat(src, &st) != 0 || !S_ISDIR(st.st_mode))
		return; /* absent on the host (or hidden from QEMU): absent here */
	mount_point(target, m->path);
	/* A bind gives overlayfs a path with no ',' or ':' to escape. */
	stage_dir(stage, sizeof stage, 'l');
	xmount(src, stage, NULL, MS_BIND, NULL);
	overlay(stage, target);
}

static void mop_share(const struct mop *m, const char *target)
{
	char stage[32];
	mount_point(target, m->path);
	if (m->op == MOP_SHARE_RO) {
		xmount(m->tag, target, "9p", MS_RDONLY | MS_NOSUID | MS_NODEV, NINEP_RO);
	} else if (m->op == MOP_SHARE_RW) {
		xmount(m->tag, target, "9p", MS_NOSUID | MS_NODEV, NINEP_RW);
	} else { /* copy-on-write */
		stage_dir(stage, sizeof stage, 's');
		nstage++;
		xmount(m->tag, stage, "9p", MS_RDONLY | MS_NOSUID | MS_NODEV, NINEP_RO);
		overlay(stage, target);
	}
}

/* A secret file: an empty one of the user's bound over it. */
static void mop_hide_file(const struct spec *s, const char *target)
{
	struct stat st;
	if (lstat(target, &st) != 0 || S_ISDIR(st.st_mode))
		return;
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

static void do_mop(const struct spec *s, const struct mop *m)
{
	char target[4200], opts[160];
	struct stat st;
	if (root_path(target, sizeof target, m->path) != 0)
		die("mount path too long: %s", m->path);
	switch (m->op) {
	case MOP_OVERLAY:
		mop_overlay(m, target);
		break;
	case MOP_TMPFS:
		mount_point(target, m->path);
		tmpfs_opts(opts, sizeof opts, m, s->uid, s->gid);
		tmpfs(target, opts);
		break;
	case MOP_SHARE_RO:
	case MOP_SHARE_RW:
	case MOP_SHARE_COW:
		mop_share(m, target);
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
		mop_hide_file(s, target);
		break;
	case MOP_MKDIR:
		break; /* done before the other steps (root_layer) */
	case MOP_IMAGE:
		mount_image(m->tag, target, m->path);
		break;
	default:
		die("unknown mount step '%c'", m->op);
	}
}

/* ---- the root ------------------------------------------------------------- */

/* The mounts every run has, made before a template is taken; setup_root
 * moves them into the new root with /dev and /proc. */
void early_mounts(void)
{
	xmount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "");
	mkdir("/dev/pts", 0755);
	xmount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620");
	mkdir("/dev/shm", 01777);
	tmpfs("/dev/shm", "mode=1777");
}

/* The new root: the host's tree; mount points the host does not have
 * (MOP_MKDIR) are made in a copy-on-write layer, which then turns read-only. */
static void root_layer(const struct spec *s)
{
	int mkdirs = 0;
	for (int i = 0; i < s->nmops; i++)
		mkdirs += s->mops[i].op == MOP_MKDIR;
	if (!mkdirs) {
		xmount("/hostroot", NEWROOT, NULL, MS_BIND, NULL);
		return;
	}
	overlay("/hostroot", NEWROOT);
	for (int i = 0; i < s->nmops; i++) {
		char target[4200];
		if (s->mops[i].op != MOP_MKDIR)
			continue;
		if (root_path(target, sizeof target, s->mops[i].path) != 0)
			die("mount path too long: %s", s->mops[i].path);
		int e = make_dirs(target, 0755);
		if (e)
			die("cannot make %s in the sandbox: %s", s->mops[i].path, strerror(e));
	}
	if (mount(NULL, NEWROOT, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID, NULL) != 0)
		die("read-only root: %s", strerror(errno));
}

static void move_into_root(const char *from, const char *to)
{
	if (mount(from, to, NULL, MS_MOVE, NULL) != 0)
		die("move %s: %s", from, strerror(errno));
}

static int host_root_mounted;

/* The host's tree as it is, for the overlays' lower layers. */
void mount_host_root(void)
{
	if (host_root_mounted)
		return;
	xmount(ROOT_TAG, "/hostroot", "9p", MS_RDONLY | MS_NOSUID, NINEP_RO);
	host_root_mounted = 1;
	stamp("root_mounted");
}

void setup_root(const struct spec *s)
{
	mount_host_root();
	tmpfs("/stage", "mode=755");
	root_layer(s);
	/* /dev moves with its /dev/pts and /dev/shm (early_mounts). */
	move_into_root("/dev", NEWROOT "/dev");
	move_into_root("/proc", NEWROOT "/proc");
	move_into_root("/sys", NEWROOT "/sys");
	for (int i = 0; i < s->nmops; i++)
		do_mop(s, &s->mops[i]);
	private_resolv_conf(s);
	if (chdir(NEWROOT) || mount(".", "/", NULL, MS_MOVE, NULL) || chroot(".") || chdir("/"))
		die("switch root: %s", strerror(errno));
}
