/* A host tree from its erofs image (sandbox/image/hostfiles.py): the image
 * file, read over the read-only 9p root, through a loop device, mounted
 * over the tree.  The host chose the image because it matches the tree
 * now; if it cannot be mounted (pruned since, say) the tree stays the 9p
 * one, which has the same files: the run goes on, and the console says why. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "init.h"

static void skipped(const char *tree, const char *what, int err)
{
	console_say("%s stays on 9p: %s: %s", tree, what, strerror(err));
}

/* A read-only loop device over `fd`; its fd, or -1 with errno set. */
static int loop_over(int fd, char *dev, size_t devsz)
{
	/* /dev is in the new root once setup_root moved it there; a pooled
	 * guest mounting ahead (premount_image) still has it at /dev. */
	const char *devdir = access(NEWROOT "/dev/loop-control", F_OK) == 0 ? NEWROOT "/dev" : "/dev";
	char path[64];
	snprintf(path, sizeof path, "%s/loop-control", devdir);
	int ctl = open(path, O_RDWR | O_CLOEXEC);
	if (ctl < 0)
		return -1;
	int nr = ioctl(ctl, LOOP_CTL_GET_FREE);
	int e = errno;
	close(ctl);
	if (nr < 0) {
		errno = e;
		return -1;
	}
	snprintf(dev, devsz, "%s/loop%d", devdir, nr);
	int lfd = open(dev, O_RDONLY | O_CLOEXEC);
	if (lfd < 0 && errno == ENOENT && mknod(dev, S_IFBLK | 0600, makedev(7, nr)) == 0)
		lfd = open(dev, O_RDONLY | O_CLOEXEC);
	if (lfd < 0)
		return -1;
	/* Buffered, not direct: the image's blocks stay in the guest's page
	 * cache once read, and 9p's readahead fetches them in large chunks. */
	struct loop_config cfg;
	memset(&cfg, 0, sizeof cfg);
	cfg.fd = (unsigned)fd;
	cfg.block_size = 4096;
	cfg.info.lo_flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
	if (ioctl(lfd, LOOP_CONFIGURE, &cfg) != 0) {
		e = errno;
		close(lfd);
		errno = e;
		return -1;
	}
	return lfd;
}

/* A loop device over the host file `path` (under /hostroot); its fd, or -1 (said on the console). */
static int loop_file(const char *path, char *dev, size_t devsz, const char *tree)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		skipped(tree, path, errno);
		return -1;
	}
	int lfd = loop_over(fd, dev, devsz);
	int e = errno;
	close(fd); /* the loop device holds the file now */
	if (lfd < 0)
		skipped(tree, "loop device", e);
	return lfd;
}

/* Pure: the blob beside an image (hostfiles.blob_name): its name with .blob for .erofs; -1 if it does not fit or end so. */
int blob_path(char *out, size_t sz, const char *image)
{
	size_t n = strlen(image);
	if (n < 6 || strcmp(image + n - 6, ".erofs") != 0 || n > sz) /* "x.blob" and its NUL: n bytes */
		return -1;
	memcpy(out, image, n - 6);
	strcpy(out + n - 6, ".blob");
	return 0;
}

/* Images a pooled guest mounted before its run (premount_image), each
 * under /images in the init's own root until a run's step moves it. */
#define MAX_PREMOUNTED 16
static struct {
	char image[4096];
	int moved;
} premounted[MAX_PREMOUNTED];
static int npremounted;

static void mount_both(const char *meta, const char *blob, const char *target, const char *tree);

void premount_image(const char *image)
{
	char meta[4200], blob[4200], dir[32];
	if (npremounted >= MAX_PREMOUNTED || image[0] != '/' || strlen(image) >= sizeof premounted[0].image ||
	    snprintf(meta, sizeof meta, "/hostroot%s", image) >= (int)sizeof meta || blob_path(blob, sizeof blob, meta) != 0)
		return;
	mkdir("/images", 0700);
	snprintf(dir, sizeof dir, "/images/%d", npremounted);
	if (mkdir(dir, 0755) != 0 && errno != EEXIST)
		return;
	mount_both(meta, blob, dir, image);
	struct stat st, top;
	/* Mounted if the directory is now another filesystem's root. */
	if (stat(dir, &st) == 0 && stat("/images", &top) == 0 && st.st_dev != top.st_dev) {
		strcpy(premounted[npremounted].image, image);
		premounted[npremounted++].moved = 0;
	}
}

/* A premounted image moved over `target`: 0, or -1 if there is none of `image`. */
static int move_premounted(const char *image, const char *target)
{
	char dir[32];
	for (int i = 0; i < npremounted; i++) {
		if (premounted[i].moved || strcmp(premounted[i].image, image) != 0)
			continue;
		snprintf(dir, sizeof dir, "/images/%d", i);
		if (mount(dir, target, NULL, MS_MOVE, NULL) != 0)
			return -1;
		premounted[i].moved = 1;
		return 0;
	}
	return -1;
}

void mount_image(const char *image, const char *target, const char *tree)
{
	char meta[4200], blob[4200];
	struct stat st;
	if (image[0] != '/' || snprintf(meta, sizeof meta, "/hostroot%s", image) >= (int)sizeof meta ||
	    blob_path(blob, sizeof blob, meta) != 0) {
		skipped(tree, "bad image path", ENAMETOOLONG);
		return;
	}
	if (stat(target, &st) != 0 || !S_ISDIR(st.st_mode)) {
		skipped(tree, "no directory there", errno ? errno : ENOTDIR);
		return;
	}
	if (move_premounted(image, target) == 0)
		return;
	mount_both(meta, blob, target, tree);
}

static void mount_both(const char *meta, const char *blob, const char *target, const char *tree)
{
	char mdev[64], bdev[64], opts[96];
	/* The metadata and the file data are two files (two loop devices):
	 * erofs reads the data from its extra device (device=). */
	int bfd = loop_file(blob, bdev, sizeof bdev, tree);
	if (bfd < 0)
		return;
	int mfd = loop_file(meta, mdev, sizeof mdev, tree);
	if (mfd >= 0) {
		/* The whole metadata image, read ahead now in large requests into
		 * the device's page cache, which is where erofs looks up inodes and
		 * directories: a first walk then finds them in memory instead of
		 * reading scattered 4 KiB blocks one loop request at a time.  It is
		 * small (1 MiB for /usr/include's 8,800 entries), and asynchronous:
		 * the mount goes on meanwhile. */
		(void)posix_fadvise(mfd, 0, 0, POSIX_FADV_WILLNEED);
		snprintf(opts, sizeof opts, "device=%s", bdev);
		/* As the 9p root it covers: read-only, setuid bits without effect. */
		if (mount(mdev, target, "erofs", MS_RDONLY | MS_NOSUID, opts) != 0)
			skipped(tree, "mount", errno);
		close(mfd);
	}
	close(bfd); /* autoclear: each device goes with its last user, the mount */
}
