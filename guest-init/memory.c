/* Guest memory: cleared before a template is taken; the OOM killer's count. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "init.h"

static long meminfo_kb(const char *key)
{
	char buf[4096];
	if (read_file("/proc/meminfo", buf, sizeof buf) < 0)
		return 0;
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

/* The host's "ZERO": the page cache goes too, then the free pages are cleared. */
void template_prepare(void)
{
	int dc = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);
	if (dc >= 0) {
		write_all(dc, "3", 1);
		close(dc);
	}
	zero_free_memory();
}

unsigned long oom_kills(void)
{
	char buf[8192];
	if (read_file("/proc/vmstat", buf, sizeof buf) < 0)
		return 0;
	char *p = strstr(buf, "\noom_kill ");
	return p ? strtoul(p + 10, NULL, 10) : 0;
}
