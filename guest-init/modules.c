/* The few kernel modules the init needs, loaded from the initramfs. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "init.h"

/* Module options given on the kernel command line as "mod.key=val", passed
 * on the way modprobe would (QEMU's microvm puts virtio_mmio.device= there). */
void module_params(const char *cmdline, const char *mod, char *out, size_t outsz)
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

static void load_module(const char *name, const char *file, const char *cmdline)
{
	char path[256], params[1024];
	snprintf(path, sizeof path, "/modules/%s", file);
	module_params(cmdline, name, params, sizeof params);
	int mfd = open(path, O_RDONLY | O_CLOEXEC);
	if (mfd < 0)
		die("cannot open module %s: %s", path, strerror(errno));
	if (syscall(SYS_finit_module, mfd, params, 0) != 0 && errno != EEXIST)
		die("cannot load module %s: %s", name, strerror(errno));
	close(mfd);
	/* The file's pages in the initramfs are guest RAM the kernel
	 * can now reuse instead of touching new pages. */
	unlink(path);
}

/* /modules/order lists "name file" lines in dependency order. */
void load_modules(void)
{
	static char cmdline[8192];
	char list[4096];
	if (read_file("/proc/cmdline", cmdline, sizeof cmdline) < 0)
		cmdline[0] = 0;
	if (read_file("/modules/order", list, sizeof list) <= 0)
		return;
	char *save = NULL;
	for (char *line = strtok_r(list, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char *file = strchr(line, ' ');
		if (!file)
			continue;
		*file++ = 0;
		load_module(line, file, cmdline);
	}
}
