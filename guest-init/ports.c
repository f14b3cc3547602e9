/* The virtio-serial ports: /dev/vport<dev>p<NR>, found by their number. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/inotify.h>
#include <unistd.h>

#include "init.h"

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
int open_port(int nr, int flags, int timeout_ms)
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
