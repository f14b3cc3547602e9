/* The control port: lines to the host (stamps, messages, fatal errors),
 * lines from it, power-off, and what a restored guest takes from the host
 * to be its own: the wall clock and the random pool. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

#include "init.h"

int ctl_fd = -1;

/* ---- output to the host ------------------------------------------------ */

static char early[4096]; /* stamps taken before the control port exists */
static size_t early_len;

void ctl_send(const char *fmt, ...)
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

void stamp(const char *phase)
{
	ctl_send("T %s %llu", phase, (unsigned long long)now_ns());
}

/* The port appears once virtio_console is loaded; what was said before
 * goes first. */
void ctl_open(void)
{
	ctl_fd = open_port(PORT_CONTROL, O_RDWR, 10000);
	if (ctl_fd < 0)
		die("control port did not appear");
	write_all(ctl_fd, early, early_len);
}

void power_off(void)
{
	reboot(RB_POWER_OFF);
	/* Without a power-off method the kernel halts; a reset with
	 * -no-reboot ends QEMU just as well. */
	reboot(RB_AUTOBOOT);
	for (;;)
		pause();
}

/* One line on the console (the host's console.log), for the host's eyes only. */
void console_say(const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	int con = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	if (con >= 0) {
		dprintf(con, "sandbox-init: %s\n", msg);
		close(con);
	}
}

/* Fatal set-up error: tell the host (or the console) and stop the VM. */
void die(const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (ctl_fd >= 0)
		ctl_send("E %s", msg);
	console_say("%s", msg);
	power_off();
}

/* ---- lines from the host ------------------------------------------------ */

static char ctl_in[4096]; /* what came after the spec; one byte kept for a NUL */
static size_t ctl_in_len;

int ctl_read(void)
{
	ssize_t n = read(ctl_fd, ctl_in + ctl_in_len, sizeof ctl_in - ctl_in_len - 1);
	if (n <= 0)
		return 0;
	ctl_in_len += (size_t)n;
	return 1;
}

int ctl_lines(int (*fn)(char *line, void *arg), void *arg)
{
	ctl_in[ctl_in_len] = 0;
	int any = 0;
	char *line = ctl_in, *nl;
	while ((nl = strchr(line, '\n'))) {
		*nl = 0;
		any |= fn(line, arg);
		line = nl + 1;
	}
	ctl_in_len = (size_t)(ctl_in + ctl_in_len - line);
	memmove(ctl_in, line, ctl_in_len);
	return any;
}

/* ---- uniqueness after a restore ---------------------------------------- */

void set_realtime(long long ns)
{
	if (ns <= 0)
		return;
	struct timespec ts = {(time_t)(ns / 1000000000ll), (long)(ns % 1000000000ll)};
	clock_settime(CLOCK_REALTIME, &ts);
}

/* The host's "C <ns>" among the lines in ctl_in: taken out, the others kept. */
static int take_clock(uint64_t sent_ns)
{
	ctl_in[ctl_in_len] = 0;
	char *line = ctl_in;
	for (char *nl; (nl = strchr(line, '\n')); line = nl + 1) {
		long long host_ns;
		if (sscanf(line, "C %lld", &host_ns) == 1) {
			set_realtime(host_ns + (long long)(now_ns() - sent_ns));
			size_t rest = (size_t)(ctl_in + ctl_in_len - (nl + 1));
			memmove(line, nl + 1, rest);
			ctl_in_len = (size_t)(line - ctl_in) + rest;
			return 1;
		}
	}
	return 0;
}

/* The host answers "spec_read" with its wall clock ("C <ns>"); take it as
 * of when that stamp left, which is closer than the spec's own time (a
 * restored guest reads the spec a few hundred ms after it was written).
 * Lines that come with it wait in ctl_in for ctl_lines. */
void sync_clock(uint64_t sent_ns)
{
	uint64_t deadline = now_ns() + 2000000000ull;
	while (!take_clock(sent_ns)) {
		uint64_t t = now_ns();
		if (t >= deadline || ctl_in_len >= sizeof ctl_in - 1)
			return; /* keep the spec's time */
		struct pollfd pfd = {ctl_fd, POLLIN, 0};
		if (poll(&pfd, 1, (int)((deadline - t) / 1000000ull) + 1) <= 0)
			continue;
		if (!ctl_read())
			return;
	}
}

/* Every guest restored from one template starts with the same pool and
 * the same clock: mix in the host's bytes, credit them and reseed now, so
 * that getrandom, AT_RANDOM and the command's ASLR differ between sandboxes. */
void reseed(const char *hex)
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
