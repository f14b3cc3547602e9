/* Fork and exec a program N times; print the first exec's time and the
 * mean of the others.  Built static, so that its own start costs nothing
 * inside a guest.  Used by benchmarks/execs. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: runn N LABEL PROGRAM [ARGS...]\n");
		return 2;
	}
	int n = atoi(argv[1]);
	double start = now_ms(), first = 0;
	for (int i = 0; i < n; i++) {
		pid_t pid = fork();
		if (pid == 0) {
			execv(argv[3], argv + 3);
			_exit(127);
		}
		int status;
		if (pid < 0 || waitpid(pid, &status, 0) < 0 || status != 0) {
			fprintf(stderr, "runn: %s failed\n", argv[3]);
			return 1;
		}
		if (i == 0)
			first = now_ms() - start;
	}
	double rest = now_ms() - start - first;
	printf("%s\t%.1f\t%.2f\n", argv[2], first, n > 1 ? rest / (n - 1) : 0.0);
	return 0;
}
