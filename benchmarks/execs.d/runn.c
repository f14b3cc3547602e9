/* Fork and exec a program N times; print the first exec's time and the
 * median, min and max of the others (ms).  Built static, so that its own
 * start costs nothing inside a guest.  Used by benchmarks/execs. */
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

static int by_value(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	if (argc < 4 || atoi(argv[1]) < 2) {
		fprintf(stderr, "usage: runn N(>=2) LABEL PROGRAM [ARGS...]\n");
		return 2;
	}
	int n = atoi(argv[1]);
	double *t = calloc((size_t)n, sizeof *t);
	if (!t)
		return 1;
	for (int i = 0; i < n; i++) {
		double start = now_ms();
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
		t[i] = now_ms() - start;
	}
	qsort(t + 1, (size_t)n - 1, sizeof *t, by_value);
	int m = n - 1; /* the execs after the first, sorted */
	double median = m % 2 ? t[1 + m / 2] : (t[m / 2] + t[1 + m / 2]) / 2;
	printf("%s\t%.1f\t%.2f\t%.2f\t%.2f\n", argv[2], t[0], median, t[1], t[n - 1]);
	return 0;
}
