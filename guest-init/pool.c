/* A pooled guest, restored and waiting for a run (sandbox/backends/pool/): before
 * its spec it mounts the host's root and runs a few short programs from
 * it, so that QEMU has translated the paths every run takes (9p lookups
 * and reads, fork, exec, the dynamic loader, exit) before a run asks.
 * Nothing of any run is in the guest yet: the spec comes after.  The
 * root stays mounted, with what these programs read in its cache
 * (cache=loose): the pool checks on the host, before it hands the guest
 * over, that none of it changed since (sandbox/backends/pool/freshness.py). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "init.h"

/* One program from the host's tree, chrooted into it, its output gone. */
static void exercise(char *const argv[])
{
	pid_t pid = fork();
	if (pid < 0)
		return;
	if (pid == 0) {
		/* The guest's own /dev/null, opened before the chroot: nothing
		 * but the programs is looked up in the host's tree. */
		int null = open("/dev/null", O_RDWR | O_CLOEXEC);
		if (chroot("/hostroot") != 0 || chdir("/") != 0)
			_exit(127);
		if (null >= 0) {
			dup2(null, 0);
			dup2(null, 1);
			dup2(null, 2);
		}
		execv(argv[0], argv);
		_exit(127);
	}
	while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
		;
}

void pool_prepare(void)
{
	mount_host_root();
	static char *const sh_true[] = {"/bin/sh", "-c", "true", NULL};
	static char *const sh_walk[] = {"/bin/sh", "-c", "cd /usr/bin && test -x env && /bin/true", NULL};
	static char *const true_[] = {"/bin/true", NULL};
	exercise(sh_true);
	exercise(sh_walk);
	exercise(true_);
	exercise(sh_true);
}
